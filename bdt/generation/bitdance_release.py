"""A released BitDance text-to-image model folder -> a bdt export (`bdt model import-bitdance`).

The release is one Hugging Face causal-LM directory (config.json, the LLM's weights, and the text
tokenizer with BitDance's tokens already added) that also holds BitDance's own components:

    ae_config.json + ae.safetensors                    the binary image tokenizer (VQModel kwargs)
    vision_head_config.json + vision_head.safetensors  the diffusion head (DiffHead kwargs; net.*)
    projector.safetensors                              the bits connector (fc1, fc2)

A diffusers port of it (`model_index.json`; text_encoder/ + tokenizer/ make the LLM's folder,
autoencoder/, diffusion_head/, projector/ each a config.json and diffusion_pytorch_model.safetensors
with the same keys) imports the same way (bdt.model.keymap.ReleaseLayout). Any of these weights
files may be sharded as Hugging Face tools write large ones (`<name>.safetensors.index.json` and
its shards, bdt.weights).

The export has the layout the trainer writes at the end of a run (bdt/training/run_dir.py):
`llm/` (the LLM's files, hard-linked where the file system allows, else copied), the connector and
head under our names, the model config, and `image_tokenizer/`. `bdt sample`, `bdt eval` and a
fine-tuning run (`init_from=`) then take it like any model bdt trained. Every weight of BitDance's
components is checked against the configs (keys, shapes, finite values) before anything is
written, and the export appears whole or not at all. The LLM's files are placed as they are:
loading the export checks them (bdt.model.backbone refuses missing or mis-shaped parameters).
"""

from __future__ import annotations

import json
import os
import posixpath

import torch
from safetensors.torch import save_file

from bdt import storage
from bdt.config import to_yaml
from bdt.model.ar import CONFIG_NAME, LLM_DIR, WEIGHTS_NAME, BitDanceModel
from bdt.model.config import ModelConfig
from bdt.model.head import head_config_from_bitdance
from bdt.model.keymap import (BD_CONNECTOR, BD_HEAD, RELEASE, ReleaseLayout, release_layout,
                              state_dict_from_bitdance)
from bdt.training.run_dir import EXPORT_IMAGE_TOKENIZER_DIR
from bdt.weights import file_present, read_safetensors, safetensors_files

# The release's 2D position table covers 4096 px per side (t2i_pipeline: 4096 // downsample rows).
MAX_SIDE_PX = 4096
BD_HEAD_COMPONENT = BD_HEAD.removesuffix("net.")  # vision_head.safetensors keys are net.*


def _read_json(url: str) -> dict:
    try:
        data = json.loads(storage.read_bytes(url))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{url}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{url}: expected a JSON object, got {type(data).__name__}")
    return data


def release_model_config(src: str, llm_config: dict, downsample: int,
                         layout: ReleaseLayout = RELEASE) -> ModelConfig:
    """Our model config for the release in `src` with this LLM config (its config.json) and an
    image tokenizer that downsamples `downsample`x."""
    url = storage.join(src, layout.head_config)
    # Ports of the release add metadata keys ("_class_name", ...): not DiffHead arguments.
    head_kwargs = {k: v for k, v in _read_json(url).items() if not k.startswith("_")}
    try:
        head = head_config_from_bitdance(head_kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{url}: {e}") from None
    hidden = llm_config.get("hidden_size")
    if head.cond_dim != hidden:
        raise ValueError(f"{url}: ch_cond {head.cond_dim} differs from the LLM's hidden_size "
                         f"{hidden!r} ({layout.llm_config})")
    # The exported model loads the LLM in the dtype the release stores it in (bf16 for 14B).
    dtype = str(llm_config.get("torch_dtype") or llm_config.get("dtype") or "float32")
    cfg = ModelConfig(head=head, parallel_num=head.tokens, pos_max_len=MAX_SIDE_PX // downsample)
    cfg.backbone.path = LLM_DIR
    cfg.backbone.dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "float32"
    cfg.validate()
    return cfg


def release_extra_weights(src: str, head_mlp: str, layout: ReleaseLayout = RELEASE
                          ) -> dict[str, torch.Tensor]:
    """The release's connector and head weights under our names."""
    return extra_from_release(read_safetensors(storage.join(src, layout.projector_weights)),
                              read_safetensors(storage.join(src, layout.head_weights)), head_mlp,
                              _weights_source(src, layout))


def _weights_source(src: str, layout: ReleaseLayout) -> str:
    return f"{src} ({layout.projector_weights}, {layout.head_weights})"


def extra_from_release(projector: dict[str, torch.Tensor], head: dict[str, torch.Tensor],
                       head_mlp: str, source: str) -> dict[str, torch.Tensor]:
    """projector.safetensors + vision_head.safetensors tensors -> our connector.* + head.*
    (bdt.model.keymap: the files' keys are MLLModel's without the component prefix)."""
    bitdance = {BD_CONNECTOR + k: v for k, v in projector.items()}
    bitdance.update({BD_HEAD_COMPONENT + k: v for k, v in head.items()})
    try:
        return state_dict_from_bitdance(bitdance, head_mlp)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _llm_files(src: str, layout: ReleaseLayout) -> dict[str, str]:
    """name -> URL of the files that make the LLM's folder: those of layout.llm_dirs (at the root
    of the release, all but BitDance's components); a name in two of them is an error."""
    files: dict[str, str] = {}
    components = _root_components(src, layout)
    for folder in layout.llm_dirs:
        fs, root = storage.filesystem(storage.join(src, folder) if folder else src)
        for path in sorted(p for p in fs.ls(root, detail=False) if fs.isfile(p)):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(".") or (not folder and name in components):
                continue
            if name in files:
                raise ValueError(f"{src}: {name} is in more than one of the LLM's folders "
                                 f"{list(layout.llm_dirs)}")
            files[name] = storage.join(src, folder, name) if folder else storage.join(src, name)
    return files


def _root_components(src: str, layout: ReleaseLayout) -> set[str]:
    """The names at the release's root that are BitDance's components, not the LLM's files: a
    sharded weights file is its index and its shards."""
    names = set(layout.components)
    for weights in (layout.ae_weights, layout.head_weights, layout.projector_weights):
        if "/" not in weights:
            names.update(posixpath.basename(url)
                         for url in safetensors_files(storage.join(src, weights)))
    return names


def _place(src_url: str, dst: str) -> None:
    """Hard-link a local file (a 14B LLM is ~30 GB), else copy it. A Hugging Face cache snapshot
    is symlinks into ../../blobs, and link(2) links a symlink itself: resolve it first."""
    if not storage.is_remote(src_url):
        try:
            os.link(os.path.realpath(src_url), dst)
            return
        except OSError:
            pass
    fs, path = storage.filesystem(src_url)
    fs.get_file(path, dst)


def import_release(src: str, out: str) -> ModelConfig:
    """Write the bdt export of the release in `src` (local dir or fsspec URL) to `out` (local,
    absent or empty); returns the model config it holds."""
    from bdt.tokenizer.io import load_tokenizer, save_tokenizer

    if not storage.exists(src):
        raise FileNotFoundError(f"BitDance release folder not found: {src}")
    layout = release_layout(src) or RELEASE
    missing = [n for n in (*layout.components, layout.llm_config)
               if not file_present(storage.join(src, n))]
    if missing:
        raise FileNotFoundError(f"{src} is not {layout.name}: missing {', '.join(missing)}")
    if storage.is_remote(out):
        raise ValueError(f"{out}: the export is written to a local directory (copy it up after)")
    storage.refuse_nonempty_dir(out, "give a new or empty output directory")
    # Everything is read and checked before anything is written.
    decoder = load_tokenizer(storage.join(src, layout.ae_weights),
                             config=storage.join(src, layout.ae_config))
    llm_config_url = storage.join(src, layout.llm_config)
    llm_config = _read_json(llm_config_url)
    cfg = release_model_config(src, llm_config, decoder.downsample_factor, layout)
    extra = release_extra_weights(src, cfg.head.mlp, layout)
    _meta_model(cfg, llm_config, llm_config_url).load_extra(extra, _weights_source(src, layout))
    if decoder.config.z_channels != cfg.head.bits:
        raise ValueError(f"{src}: the image tokenizer makes {decoder.config.z_channels}-bit "
                         f"tokens, the head ({layout.head_config}) predicts {cfg.head.bits}")
    llm_files = _llm_files(src, layout)

    with storage.staged_dir(out) as tmp:  # a reader never sees half an export
        os.makedirs(os.path.join(tmp, LLM_DIR))
        for name, url in llm_files.items():
            _place(url, os.path.join(tmp, LLM_DIR, name))
        _check_text_tokenizer(os.path.join(tmp, LLM_DIR), cfg, llm_config.get("vocab_size"), src)
        save_file({k: v.contiguous() for k, v in extra.items()}, os.path.join(tmp, WEIGHTS_NAME))
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            f.write(to_yaml(cfg))
        save_tokenizer(decoder, os.path.join(tmp, EXPORT_IMAGE_TOKENIZER_DIR))
    return cfg


def _check_text_tokenizer(llm_dir: str, cfg: ModelConfig, rows: int | None, src: str) -> None:
    """The release's text tokenizer must already hold BitDance's tokens, one per embedding row
    (`rows`): tokens added here would get mean-initialised rows, and the model would read
    garbage."""
    from bdt.model.text_tokenizer import bitdance_tokens, load_text_tokenizer, missing_tokens

    tokenizer = load_text_tokenizer(llm_dir)
    missing = missing_tokens(tokenizer, bitdance_tokens(cfg.parallel_num))
    if missing or len(tokenizer) != rows:
        raise ValueError(f"{src}: its text tokenizer is not the model's: "
                         + (f"it lacks {len(missing)} of BitDance's tokens ({missing[:3]} ...)"
                            if missing else f"{len(tokenizer)} tokens for {rows} embedding rows"))


def _meta_model(cfg: ModelConfig, llm_config: dict, url: str) -> BitDanceModel:
    """The model the release describes, on the meta device (shapes only, no weights read);
    `url` names where `llm_config` came from."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(llm_config)
    try:
        hf_config = AutoConfig.for_model(kwargs.pop("model_type", ""), **kwargs)
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, TypeError) as e:  # e.g. an unknown model type, an int dtype
        raise ValueError(f"{url}: not a Hugging Face causal-LM config ({e})") from None
    with torch.device("meta"):
        return BitDanceModel(cfg, llm)
