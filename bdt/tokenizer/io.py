"""Load and save tokenizers: local paths or fsspec URLs (s3://...).

A tokenizer directory holds `config.json` (see bdt/tokenizer/config.py: our flat form or the
released `ddconfig` form) and `model.safetensors` (keys = `BinaryAutoencoder.state_dict()`, which
are the released BitDance VQModel keys). For official downloads, the directory may instead hold
one `*.safetensors` file of any name (or one sharded: `*.safetensors.index.json` + its shards,
bdt.weights), or one torch file (`.pt/.pth/.bin/.ckpt`, read with
`torch.load(weights_only=True)`, never unpickling code), and the config may be one `*config.json`.
A weights file path can also be given directly: its config is `config=` (a TokenizerConfig, dict
or path), else `<stem>_config.json` beside it (the release's naming), else `config.json`.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any, Mapping

import torch
from safetensors.torch import save as save_safetensors

from bdt import storage
from bdt.tokenizer.autoencoder import BinaryAutoencoder
from bdt.tokenizer.config import TokenizerConfig
from bdt.weights import (INDEX_SUFFIX, compressed_records, listing, read_safetensors,
                         state_dict_problems)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SAFETENSORS_SUFFIXES = (".safetensors", ".safetensors" + INDEX_SUFFIX)


def save_tokenizer(model: BinaryAutoencoder, path: str) -> None:
    """Write `config.json` + `model.safetensors` into directory `path` (created if needed)."""
    storage.makedirs(path)
    config = json.dumps(model.config.to_dict(), indent=1) + "\n"
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # Weights first, config last: a directory with a config.json is a complete one.
    storage.write_bytes_atomic(storage.join(path, WEIGHTS_NAME), save_safetensors(state))
    storage.write_bytes_atomic(storage.join(path, CONFIG_NAME), config.encode())


def load_tokenizer(path: str, config: TokenizerConfig | Mapping[str, Any] | str | None = None,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   ) -> BinaryAutoencoder:
    """Build the model from the config and load the weights (strict: every key, every shape).

    Raises ValueError naming missing/unexpected keys, shape mismatches (expected vs got), and
    integer or NaN/inf tensors, FileNotFoundError when the directory lacks a config or weights file.
    """
    weights_url, config_url = resolve_files(path, config is None)
    cfg = _read_config(config if config is not None else config_url)
    state = read_state_dict(weights_url)
    # Build on meta (no random init of ~460M params), then adopt the loaded tensors.
    with torch.device("meta"):
        model = BinaryAutoencoder(cfg)
    check_state_dict(model, state, source=weights_url, dtype=dtype)
    model.load_state_dict(state, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def check_tokenizer(path: str, dtype: torch.dtype = torch.float32) -> None:
    """load_tokenizer's checks of the config against the weights, without making the model:
    for a driver that only hands the path on to workers (the extraction job, before Ray)."""
    weights_url, config_url = resolve_files(path, need_config=True)
    with torch.device("meta"):
        model = BinaryAutoencoder(_read_config(config_url))
    check_state_dict(model, read_state_dict(weights_url), source=weights_url, dtype=dtype)

def tokenizer_identity(path: str) -> dict[str, Any]:
    """The tokenizer's config and a sha256 per file of its directory (weights included): what an
    extraction manifest records and training checks its shards against. bdt's temp files (a
    killed writer's leftovers, storage.is_temp_name) are no part of it; any other file is."""
    fs, root = storage.filesystem(path)
    with storage.naming_url(path, "listing image tokenizer"):
        if not fs.isdir(root):
            raise FileNotFoundError(f"tokenizer: not a directory: {path}")
        found = sorted(fs.find(root))
    files = {}
    for p in found:
        if storage.is_temp_name(posixpath.basename(p)):
            continue
        rel = p[len(root.rstrip("/")) + 1:]
        files[rel] = storage.sha256(path.rstrip("/") + "/" + rel, "hashing")[0]
    try:
        config = json.loads(storage.read_bytes(storage.join(path, CONFIG_NAME)))
    except (FileNotFoundError, ValueError, RecursionError):  # absent, or not JSON
        config = None
    return {"path": path, "config": config, "sha256": files}


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                     dtype: torch.dtype | None = None) -> None:
    """Compare a checkpoint with the model's expected keys, shapes and values (finite once cast
    to `dtype`, default the model's); one clear error if it does not fit
    (bdt.weights.state_dict_problems)."""
    parts = state_dict_problems(model.state_dict(), state, dtype)
    if not parts:
        return
    cfg = getattr(model, "config", None)
    arch = (f" (config: ch={cfg.ch}, ch_mult={list(cfg.ch_mult)}, num_res_blocks={cfg.num_res_blocks}, "
            f"z_channels={cfg.z_channels}, gan_decoder={cfg.gan_decoder})") if cfg is not None else ""
    raise ValueError(f"checkpoint {source} does not fit the tokenizer{arch}: " + "; ".join(parts))


def resolve_files(path: str, need_config: bool) -> tuple[str, str | None]:
    """(weights URL, config URL or None) for a directory or a weights-file path."""
    fs, fs_path = storage.filesystem(path)
    if not fs.exists(fs_path) and not storage.exists(path + INDEX_SUFFIX):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if not fs.isdir(fs_path):
        if not need_config:
            return path, None
        # Beside `ae_d32c128.safetensors` the release names its config `ae_d32c128_config.json`.
        folder, name = posixpath.split(path.rstrip("/"))
        stem = name.removesuffix(INDEX_SUFFIX).rsplit(".", 1)[0]  # the index names its weights
        siblings = [storage.join(folder or ".", n) for n in (f"{stem}_config.json", CONFIG_NAME)]
        for sibling in siblings:
            if storage.exists(sibling):
                return path, sibling
        raise FileNotFoundError(f"no config for weights file {path}: pass config=... or put "
                                f"{stem}_config.json or {CONFIG_NAME} beside it")
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(fs_path, detail=False))
    weights = _pick(names, [WEIGHTS_NAME, WEIGHTS_NAME + INDEX_SUFFIX],
                    # a whole file beside its shards' index wins, as in transformers (weights.py)
                    lambda n: n.endswith(".safetensors") and n + INDEX_SUFFIX in names,
                    lambda n: n.endswith(_SAFETENSORS_SUFFIXES[1]),  # the shards' index
                    lambda n: n.endswith(".safetensors"),
                    lambda n: n.endswith(_TORCH_SUFFIXES), what="weights", path=path)
    config = None
    if need_config:
        config = _pick(names, [CONFIG_NAME], lambda n: n.endswith("config.json"), what="config",
                       path=path)
    return storage.join(path, weights), (storage.join(path, config) if config else None)


def _pick(names: list[str], preferred: list[str], *matchers, what: str, path: str) -> str:
    """The preferred name, else the single file matching the first matcher that matches any."""
    for name in preferred:
        if name in names:
            return name
    for match in matchers:
        found = [n for n in names if match(n)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"tokenizer directory {path} has several candidate {what} files {found}; "
                             f"keep one or name it {preferred[0]}")
    raise FileNotFoundError(f"tokenizer directory {path} has no {what} file (expected {preferred[0]}); "
                            f"it holds {names}")


def _read_config(config: TokenizerConfig | Mapping[str, Any] | str | None) -> TokenizerConfig:
    if isinstance(config, TokenizerConfig):
        return config.validate()
    if isinstance(config, str):
        try:
            data = json.loads(storage.read_bytes(config))
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested past the parser
            raise ValueError(f"{config}: not valid JSON: {str(exc)[:200]}") from None
        try:
            return TokenizerConfig.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{config}: {exc}") from None
    if config is None:
        raise FileNotFoundError("no tokenizer config given")
    return TokenizerConfig.from_dict(config)


def _load_failure(exc: Exception) -> str:
    """The reason in one line. torch's weights-only refusal opens with advice to load the file
    unsafely or allowlist its classes (never an option here): the reason is the line after."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        lines = [line for line in lines[1:] if "weights_only" not in line
                 and not line.startswith("(")] or lines
    reason = lines[0] if lines else type(exc).__name__
    return reason.removeprefix("WeightsUnpickler error: ").split(". Please use")[0]


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """{name: tensor} from a safetensors file (or shard index) or a weights-only torch file (a
    training checkpoint's nested "state_dict"/"model" too); ValueError naming the file when it
    is neither, or holds other than named tensors. Never unpickles code."""
    if url.endswith(_SAFETENSORS_SUFFIXES):
        return read_safetensors(url)
    data = storage.read_bytes(url)  # a missing file stays a FileNotFoundError
    try:
        packed = compressed_records(data)
        if packed:
            raise ValueError(f"record(s) {listing(packed)} are compressed, which torch.save "
                             f"never writes")
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code: report, never retry unsafely
        raise ValueError(f"{url}: cannot read as a weights-only torch file: "
                         f"{_load_failure(exc)}") from None
    # Training checkpoints often nest the weights one level down.
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise ValueError(f"{url}: expected a mapping of parameter names to tensors")
    return dict(obj)

