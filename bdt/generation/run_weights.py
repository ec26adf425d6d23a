"""The weights and records a training run dir holds, read for sampling without its export:
a checkpoint's module weights (the EMA's averages in their place), each file checked against the
checkpoint's marker and read with torch.load(weights_only=True), which unpickles no code; the
run's config.yaml read with the trainer's schema; its record of the LLM's config and tokenizer.
Every problem is an OSError naming the file."""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from omegaconf import OmegaConf

from bdt.model.backbone_config import BackboneConfig, check_source
from bdt.training import run_dir as layout


def run_config(cfg_path: str):
    """A run's config.yaml read with the trainer's schema (a TrainConfig); OSError naming the
    file and the key that does not fit it (no model is rebuilt from a damaged record)."""
    from bdt.config import ConfigError, load
    from bdt.training.ar.config import TrainConfig

    layout.read_config(cfg_path)  # OSError for a record with interpolations: never resolved
    try:
        cfg = OmegaConf.to_object(load(TrainConfig, [cfg_path]))
    except ConfigError as e:  # names the file
        raise OSError(str(e)) from None
    try:
        cfg.model.validate()
    except ValueError as e:
        raise OSError(f"{cfg_path}: {e}") from None
    return cfg


def recorded_backbone(run_dir: str, backbone: BackboneConfig) -> BackboneConfig:
    """The LLM's config and tokenizer as the run recorded them when it started (overrides applied,
    BitDance's tokens added), so that a run dir copied elsewhere needs no pretrained LLM folder;
    a run from before the record keeps its configured path."""
    recorded = os.path.join(run_dir, layout.BACKBONE_DIR)
    if os.path.lexists(recorded):
        gaps = _record_gaps(recorded)
        if gaps:
            raise OSError(damaged_record(recorded, backbone.path, "; ".join(gaps)))
        return replace(backbone, path=recorded, config_overrides={}, from_scratch=False)
    try:
        check_source(backbone.path)
    except (OSError, ValueError) as e:
        raise OSError(f"{run_dir!r} holds no {layout.BACKBONE_DIR}/ record of its LLM's config "
                      f"and tokenizer (the run started before runs wrote one), and {e}: sample "
                      f"from its export, or put the LLM back at that path") from None
    return backbone


VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _record_gaps(recorded: str) -> list[str]:
    """What a backbone/ record lacks of what save_llm_description writes (transformers would
    otherwise fail deep inside, or build a tokenizer without BitDance's tokens)."""
    if not os.path.isdir(recorded):
        return ["not a directory"]
    gaps = [f"no {name}" for name in ("config.json", "tokenizer_config.json")
            if not os.path.isfile(os.path.join(recorded, name))]
    if not any(os.path.isfile(os.path.join(recorded, name)) for name in VOCAB_FILES):
        gaps.append(f"no vocabulary file ({', '.join(VOCAB_FILES)})")
    return gaps


def damaged_record(recorded: str, configured: str, why: str) -> str:
    return (f"{recorded}: the run's record of its LLM's config and text tokenizer is damaged "
            f"({why}): restore it from the original run dir, or remove it to build from "
            f"model.backbone.path {configured!r}")


MODEL_STATES = "model/mp_rank_00_model_states.pt"  # DeepSpeed's whole module (ZeRO-0/1/2)


def checkpoint_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    """The module's tensors in `checkpoint`, the EMA's averages in place of those it keeps; its
    files checked against the marker first; OSError naming the file otherwise."""
    _check_sampled_files(checkpoint)
    states = os.path.join(checkpoint, *MODEL_STATES.split("/"))
    saved = _load_weights_only(states, "the module weights")
    module = _tensors(saved.get("module") if isinstance(saved, dict) else None, states, "module")
    # The export swaps the fp32 averages into the parameters, in their dtype (bf16 under
    # deepspeed.precision=bf16): rounded as there, a checkpoint samples what its export would.
    ema = {k: v.to(module[k].dtype) if k in module else v
           for k, v in _ema_weights(checkpoint).items()}
    return {**module, **ema}


def _check_sampled_files(checkpoint: str) -> None:
    """OSError naming the file unless the files sampling reads (the module weights, the EMA's
    shared.pt) are what `checkpoint`'s marker lists: a damaged or replaced file is refused before
    anything is built. The optimizer state, not read here, is left unhashed."""
    from bdt.training import integrity
    from bdt.training.checkpoint import SHARED_FILE

    try:
        files = integrity.read_marker(checkpoint).get("files") or {}
    except integrity.CheckpointUnusable as e:
        raise OSError(str(e)) from None
    if MODEL_STATES not in files:
        raise OSError(f"checkpoint {checkpoint}: its marker lists no {MODEL_STATES} (no file "
                      f"checksums, or not a ZeRO-0/1/2 checkpoint of the model)")
    for rel in (MODEL_STATES, SHARED_FILE):
        listed = rel in files
        if not listed and not os.path.lexists(os.path.join(checkpoint, rel)):
            continue  # no EMA
        problem = (integrity.problem(checkpoint, rel, files[rel]) if listed
                   else f"{rel}: not listed in the marker")
        if problem:
            raise OSError(f"checkpoint {checkpoint}: {problem}")


def _tensors(value: object, path: str, what: str) -> dict[str, torch.Tensor]:
    """`value` as a name -> tensor dict; OSError naming the file when it is anything else."""
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        raise OSError(f"{path}: its {what!r} entry is not a dict of named tensors")
    return value


def _ema_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    """The averaged parameters saved beside `checkpoint`'s engine state; {} without an EMA."""
    from bdt.training.checkpoint import SHARED_FILE

    path = os.path.join(checkpoint, SHARED_FILE)
    if not os.path.isfile(path):
        return {}
    shared = _load_weights_only(path, "the EMA weights")
    ema = shared.get("ema") if isinstance(shared, dict) else None
    if ema is None:
        return {}
    shadow = ema.get("shadow") if isinstance(ema, dict) else None
    return _tensors(shadow, path, "ema.shadow")


def _load_weights_only(path: str, what: str) -> dict:
    """torch.load(weights_only=True), which unpickles no code; its refusal or a damaged file is
    a user-facing file problem."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal or read error
        raise OSError(f"{path}: cannot read {what} safely ({e})") from None
