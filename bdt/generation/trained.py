"""A trained model ready to turn prompts into images: what `bdt sample` and `bdt eval` load.

`load_trained(path)` accepts
  * an export (`<run_dir>/export`, written by the trainer, bdt/training/ar/export.py): the model
    (`BitDanceModel.save_pretrained` layout), `image_tokenizer/` and `train_config.yaml`;
  * a training run dir: its `export/` if present, else its newest complete checkpoint that
    reads (a damaged one is passed over, as the trainer's resume does);
  * a checkpoint dir `<run_dir>/checkpoints/step_N` (complete, i.e. with its marker);
    checkpoints of ZeRO-0/1/2 only: their model-states file holds the whole module (ZeRO-3
    partitions it);
and checks that every file is there before building anything, so a half-copied export fails
with the list of what is missing rather than deep inside from_pretrained.

Buckets: a side must be a multiple of the tokenizer's downsample factor x the model's patch side
(method §4: whole ps x ps patches of tokens). When the training shards' manifests are reachable,
the buckets they hold are the ones the model was trained for, and others are refused unless
`any_bucket` (2D positions outside the trained grids are extrapolation).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from bdt import storage
from bdt.generation.grid import to_pil
from bdt.generation.run_weights import (MODEL_STATES, VOCAB_FILES, checkpoint_weights,
                                        damaged_record, recorded_backbone, run_config)
from bdt.generation.sampling import SamplingConfig, check_prompts, generate
from bdt.model.ar import CONFIG_NAME, LLM_DIR, WEIGHTS_NAME, BitDanceModel, read_model_config
from bdt.model.attention import resolve_backend
from bdt.model import llm_config_record
from bdt.model.keymap import release_layout
from bdt.model.text_tokenizer import load_text_tokenizer, query_tokens_held
from bdt.training import run_dir as layout
from bdt.weights import file_present

log = logging.getLogger(__name__)

# llm/tokenizer_config.json: without it the tokenizer loads with other special tokens, and the
# error blamed the weights ("the tokenizer does not belong to these weights").
EXPORT_FILES = (CONFIG_NAME, WEIGHTS_NAME, f"{LLM_DIR}/config.json",
                f"{LLM_DIR}/tokenizer_config.json",
                f"{layout.EXPORT_IMAGE_TOKENIZER_DIR}/config.json",
                f"{layout.EXPORT_IMAGE_TOKENIZER_DIR}/model.safetensors")


def parse_bucket(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '96x64' -> (W=96, H=64), in pixels."""
    parts = text.lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise ValueError(f"bucket {text!r}: expected S or WxH in pixels, e.g. 128 or 96x64"
                         ) from None
    if len(parts) > 2 or w <= 0 or h <= 0:
        raise ValueError(f"bucket {text!r}: expected S or WxH with positive sides, e.g. 96x64")
    return w, h


def pick_device(name: str = "auto") -> torch.device:
    """auto, cpu or cuda[:N]; ValueError for anything else or a GPU this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s)")
    return device


@dataclass
class TrainedModel:
    model: BitDanceModel
    decoder: torch.nn.Module  # the image tokenizer (BinaryAutoencoder); only decode is used
    source: str = ""
    buckets: list[tuple[int, int]] | None = None  # (W, H) px trained on; None = unknown

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def decoder_device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def unit(self) -> int:
        """Bucket sides must be multiples of this many pixels."""
        return self.decoder.downsample_factor * self.model.cfg.patch_size

    def token_grid(self, width: int, height: int, any_bucket: bool = False) -> tuple[int, int]:
        """(h, w) latent tokens of a width x height px bucket; ValueError if unusable."""
        f, ps = self.decoder.downsample_factor, self.model.cfg.patch_size
        if width < 1 or height < 1:
            raise ValueError(f"bucket {width}x{height}: sides must be positive")
        if width % self.unit or height % self.unit:
            raise ValueError(f"bucket {width}x{height}: sides must be multiples of {self.unit} px "
                             f"(tokenizer downsample {f} x patch side {ps} of P="
                             f"{self.model.cfg.parallel_num})")
        if not any_bucket and self.buckets is not None and (width, height) not in self.buckets:
            known = ", ".join(f"{w}x{h}" for w, h in self.buckets)
            raise ValueError(f"bucket {width}x{height} was not trained (the training shards hold "
                             f"{known}); pass --any-bucket to sample it anyway")
        return height // f, width // f

    @torch.no_grad()
    def images(self, prompts: Sequence[str], width: int, height: int,
               sampling: SamplingConfig, batch: int = 8, any_bucket: bool = False,
               progress: bool = True, desc: str = "sampling") -> list[Image.Image]:
        """One image per prompt. Batch k (of `batch` prompts) samples with a seed drawn from
        (sampling.seed, k) and decodes with a generator of that seed: reproducible for a given
        batch size, and no batch of one seed repeats a batch of another (seed + k did: seed 1's
        batches were seed 0's from the second on)."""
        from tqdm import tqdm

        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        h, w = self.token_grid(width, height, any_bucket)
        check_prompts(self.model, prompts, h, w)  # all of them, before the first batch samples
        out: list[Image.Image] = []
        with tqdm(total=len(prompts), desc=desc, unit="img", disable=not progress) as bar:
            for k, chunk in enumerate(batches(prompts, batch)):
                out += self.batch_images(k, chunk, h, w, sampling)
                bar.update(len(chunk))
        return out

    def batch_images(self, k: int, prompts: Sequence[str], h: int, w: int,
                     sampling: SamplingConfig) -> list[Image.Image]:
        """Batch k of `images` (its prompts, on an h x w token grid): the same images whichever
        process makes it."""
        # bf16 autocast on GPU (the released models run in bf16); CPU stays fp32, where bf16
        # is slower at these widths (tokenizers/README.md).
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        seed = batch_seed(sampling.seed, k)
        with autocast:
            bits_BhwC = generate(self.model, list(prompts), h, w, replace(sampling, seed=seed))
            # on the decoder's device: a generative decoder draws its noise there
            gen = torch.Generator(device=self.decoder_device).manual_seed(seed)
            return to_pil(self.decoder.decode(bits_BhwC, generator=gen))


def batches(prompts: Sequence[str], batch: int) -> list[list[str]]:
    """The prompts of each batch of a sampling run, in order."""
    return [list(prompts[start:start + batch]) for start in range(0, len(prompts), batch)]


def batch_seed(seed: int, k: int) -> int:
    """The seed of batch k of a sampling run seeded `seed` (63 bits, for torch.Generator)."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0] >> 1)


def load_trained(path: str, device: str | torch.device = "cpu") -> TrainedModel:
    """Resolve `path` (export, or run dir: export or newest checkpoint) and load it on `device`."""
    from bdt.training.checkpoint import MARKER

    if storage.is_remote(path):  # run dirs, and so their exports, are local (checkpoints may be remote)
        raise OSError(f"model path {path!r} is remote: sampling reads a local export or run "
                      f"directory; copy it to this machine first")
    if not os.path.exists(path):
        raise OSError(f"model path {path!r} does not exist")
    if not os.path.isdir(path):
        raise OSError(f"model path {path!r} is not a directory (give a training export or run dir)")
    if not os.path.exists(os.path.join(path, CONFIG_NAME)):
        if os.path.isfile(os.path.join(layout.export_dir(path), CONFIG_NAME)):
            path = layout.export_dir(path)
        elif os.path.isfile(os.path.join(path, layout.CONFIG_NAME)):
            return _from_run_checkpoint(path, device)
        elif os.path.isfile(os.path.join(path, MARKER)):  # <run_dir>/checkpoints/step_N
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
            if os.path.isfile(os.path.join(run_dir, layout.CONFIG_NAME)):
                return _from_run_checkpoint(run_dir, device, os.path.abspath(path))
    for _ in range(2):
        before = _folder_identity(path)
        try:
            trained, error = _load_export(path, device), None
        except Exception as e:  # noqa: BLE001 - raised as it was unless the folder was swapped
            trained, error = None, e
        if _folder_identity(path) == before:
            if error is not None:
                raise error
            return trained
        log.warning("%s was replaced while it loaded (its run exported again): loading it again",
                    path)
    raise OSError(f"{path!r} was replaced while it loaded, twice: a training run is exporting "
                  f"to it; load it once that run has finished")


def _folder_identity(path: str) -> tuple[int, int, int] | None:
    """What changes when a run's end swaps its new export in under `path` (export.py renames a
    whole folder there): None while the name is missing between two renames."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _load_export(path: str, device: str | torch.device) -> TrainedModel:
    """The export at `path`. Its files are opened one by one, each through `path`: a swap
    between two opens mixes two exports (a model with another's image tokenizer), which
    load_trained detects and loads again."""
    missing = [f for f in EXPORT_FILES if not file_present(os.path.join(path, f))]
    # Any one of them: without, transformers' error of many lines named no file.
    if not any(file_present(os.path.join(path, LLM_DIR, f)) for f in VOCAB_FILES):
        missing.append(f"{LLM_DIR}/{VOCAB_FILES[0]} (or {', '.join(VOCAB_FILES[1:])})")
    release = release_layout(path) if missing else None
    if release is not None:
        raise OSError(f"{path!r} is {release.name}: convert it once with "
                      f"`bdt model import-bitdance --src {path} --out DIR`, then use DIR")
    if missing:
        raise OSError(f"{path!r} is not a complete model export: missing {', '.join(missing)} "
                      f"(expected the <run_dir>/export that bdt/train.py writes)")
    train_cfg = os.path.join(path, layout.EXPORT_TRAIN_CONFIG_NAME)
    tokenizer = load_text_tokenizer(os.path.join(path, LLM_DIR))  # read once, checked, used
    _check_export_parallel_num(path, train_cfg, query_tokens_held(tokenizer))
    llm_config_record.check(path, os.path.join(path, LLM_DIR))
    backend = runnable_backend(read_model_config(path).attn_backend, device)
    model = BitDanceModel.from_pretrained(path, tokenizer=tokenizer, attn_backend=backend
                                          ).to(device).eval()
    decoder = _load_decoder(os.path.join(path, layout.EXPORT_IMAGE_TOKENIZER_DIR), model, device)
    buckets = _trained_buckets(train_cfg) if os.path.isfile(train_cfg) else None
    return TrainedModel(model, decoder, path, buckets)


def runnable_backend(name: str, device: str | torch.device) -> str:
    """The attention backend the model trained with where it runs on `device`, else `auto`:
    a model trained with varlen or flash (CUDA kernels) samples on a CPU or without flash-attn
    too, and sampling's masks are the same in every backend (bdt.model.attention)."""
    try:
        resolve_backend(name, torch.device(device))
    except ValueError as e:
        log.warning("the model's attention backend does not run here (%s): sampling with "
                    "'auto'", e)
        return "auto"
    return name


def _check_export_parallel_num(path: str, train_cfg: str, held: int) -> None:
    """OSError unless the export's parallel_num (P) is the one it was trained with: an edited
    model_config.yaml sampled garbage without a word (a larger P with query tokens added
    untrained, a smaller one with fewer tokens per step than the head learnt). The training
    config records P; an import (no training config) has the query tokens of its P exactly.
    `held`: the P of the query tokens the export's text tokenizer holds."""
    p = read_model_config(path).parallel_num
    source = os.path.join(path, CONFIG_NAME)
    if os.path.isfile(train_cfg):
        trained = layout.read_config(train_cfg).get("model", {}).get("parallel_num")
        if trained is not None and int(trained) != p:
            raise OSError(f"{source}: parallel_num is {p}, but the model was trained with "
                          f"{trained} ({train_cfg}): restore parallel_num: {trained}")
    if held < p or (held != p and not os.path.isfile(train_cfg)):
        raise OSError(f"{source}: parallel_num is {p}, but the model's text tokenizer holds the "
                      f"query tokens of P = {held}: restore parallel_num: {held}")


def _load_decoder(path: str, model: BitDanceModel, device: str | torch.device) -> torch.nn.Module:
    """The image tokenizer at `path`, refused unless it decodes the bits the model samples (another
    one failed at the first decode, after a whole batch was sampled, naming no file)."""
    from bdt.tokenizer.io import load_tokenizer

    decoder = load_tokenizer(path, device=device)
    bits = decoder.config.bits_per_token
    if bits != model.cfg.head.bits:
        raise OSError(f"{path}: this image tokenizer decodes {bits}-bit tokens, the model samples "
                      f"{model.cfg.head.bits}-bit ones: it is not the model's tokenizer")
    return decoder


def _trained_buckets(train_config_path: str, relative_ok: bool = False
                     ) -> list[tuple[int, int]] | None:
    """Union of the buckets in the training stages' extraction manifests; None when any stage's
    manifest is unreachable (plain shard dirs, moved data): then only the divisibility check.
    `relative_ok`: relative shards are read from the working directory (a run's own record)."""
    from bdt.data.shard_source import list_shards

    cfg = layout.read_config(train_config_path)
    stages = cfg.get("stages")
    if not OmegaConf.is_list(stages) or not all(
            OmegaConf.is_dict(s) and isinstance(s.get("shards"), str) for s in stages):
        return None  # not a record the trainer wrote: buckets unknown
    found: list[tuple[int, int]] = []
    for stage in stages:
        if not (relative_ok or storage.is_remote(stage.shards) or os.path.isabs(stage.shards)):
            return None  # relative to a working directory that is not known (older exports)
        try:
            shards = list_shards(stage.shards, stage.get("family", ""),
                                 allow_incomplete=True)  # buckets only
        except Exception:  # noqa: BLE001 - best effort (moved data, no credentials): then unknown
            return None
        if shards.manifest is None:
            return None
        families = shards.manifest.get("stages", {})
        family = stage.get("family", "") or next(iter(families), "")
        for w, h in families.get(family, {}).get("buckets", []):
            if (w, h) not in found:
                found.append((int(w), int(h)))
    return found or None


def _from_run_checkpoint(run_dir: str, device: str | torch.device,
                         checkpoint: str | None = None) -> TrainedModel:
    """A run without an export yet: rebuild the model from its config.yaml and load the module
    weights of `checkpoint` (default: the newest complete one) with torch.load(weights_only=True),
    which unpickles no code; the EMA weights in their place where the run keeps an EMA, as its
    in-loop samples and its export use them."""
    from bdt.training.checkpoint import list_checkpoints

    cfg_path = os.path.join(run_dir, layout.CONFIG_NAME)
    cfg = run_config(cfg_path)
    root = layout.checkpoint_root(run_dir, cfg.checkpoint.dir)
    if "://" in root:
        raise OSError(f"{run_dir!r} has no export and its checkpoints are remote ({root}); "
                      f"sample from an export")
    tags = [tag for _, tag, complete in list_checkpoints(root) if complete]
    if not tags and checkpoint is None:
        raise OSError(f"{run_dir!r} is a training run with neither an export/ nor a complete "
                      f"checkpoint in {root}")
    if cfg.deepspeed.zero_stage == 3:
        raise OSError(f"{run_dir!r}: ZeRO-3 checkpoints hold partitioned weights; let the run "
                      f"finish (it writes export/) or consolidate with DeepSpeed's zero_to_fp32")
    if not cfg.data.tokenizer:
        raise OSError(f"{cfg_path}: data.tokenizer is empty, so the run names no image tokenizer "
                      f"to decode with")
    model_cfg = cfg.model
    model_cfg.attn_backend = runnable_backend(model_cfg.attn_backend, device)
    configured = model_cfg.backbone.path
    model_cfg.backbone = recorded_backbone(run_dir, model_cfg.backbone)

    def damaged(e: Exception) -> OSError:  # the run's backbone/ record, not the configured LLM
        return OSError(damaged_record(model_cfg.backbone.path, configured,
                                      f"it does not rebuild the checkpoint's model: {e}"))

    tokenizer = None  # the record's, read once: checked here, then the model's
    if model_cfg.backbone.path != configured:  # the run's own record, made with its P
        try:
            tokenizer = load_text_tokenizer(model_cfg.backbone.path)
        except (OSError, ValueError) as e:
            raise damaged(e) from None
        held = query_tokens_held(tokenizer)
        if held < model_cfg.parallel_num:
            raise OSError(f"{cfg_path}: model.parallel_num is {model_cfg.parallel_num}, but the "
                          f"run's LLM record holds the query tokens of P = {held}: the run was "
                          f"trained with P = {held}")
    if checkpoint is None:
        checkpoint, module = _newest_readable(root, tags)
    else:
        module = checkpoint_weights(checkpoint)
    states = os.path.join(checkpoint, *MODEL_STATES.split("/"))
    # The LLM is built from its config and takes the checkpoint's tensors (its pretrained
    # weights are never read); connector and head are built on meta and take theirs.
    llm = {k.removeprefix("llm."): v for k, v in module.items() if k.startswith("llm.")}
    try:
        model = BitDanceModel.from_config(model_cfg, extra_on_meta=True, llm_weights=llm,
                                          tokenizer=tokenizer)
    except (OSError, ValueError) as e:
        if model_cfg.backbone.path == configured:
            raise
        raise damaged(e) from None
    model.load_extra({k: v for k, v in module.items() if not k.startswith("llm.")}, states)
    decoder = _load_decoder(cfg.data.tokenizer, model, device)
    # Its record names paths as the run did: relative shards from here, as data.tokenizer above.
    buckets = _trained_buckets(cfg_path, relative_ok=True)
    return TrainedModel(model.to(device).eval(), decoder, checkpoint, buckets)


def _newest_readable(root: str, tags: list[str]) -> tuple[str, dict[str, torch.Tensor]]:
    """The newest complete checkpoint under `root` whose weights verify and load, with them: a
    damaged one is passed over with a warning, as the trainer's resume passes over it."""
    problems = []
    for tag in reversed(tags):
        checkpoint = os.path.join(root, tag)
        try:
            return checkpoint, checkpoint_weights(checkpoint)
        except OSError as e:
            log.warning("passing over checkpoint %s: %s", checkpoint, e)
            problems.append(str(e))
    raise OSError(f"none of the {len(tags)} complete checkpoints in {root} can be read: "
                  + "; ".join(problems))
