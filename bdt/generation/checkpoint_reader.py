"""A training run without an export yet, loaded from a checkpoint: the model rebuilt from the run's
config.yaml and its backbone/ record, with the module weights of a complete checkpoint (ZeRO-0/1/2
only: their model-states file holds the whole module, ZeRO-3 partitions it)."""

from __future__ import annotations

import logging
import os

import torch

from bdt.generation.run_weights import (MODEL_STATES, checkpoint_weights, damaged_record,
                                        recorded_backbone, run_config)
from bdt.generation.trained import TrainedModel, load_decoder, runnable_backend, trained_buckets
from bdt.model.ar import BitDanceModel
from bdt.model.text_tokenizer import load_text_tokenizer, query_tokens_held
from bdt.training import run_dir as layout

log = logging.getLogger(__name__)


def from_run_checkpoint(run_dir: str, device: str | torch.device,
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
    decoder = load_decoder(cfg.data.tokenizer, model, device)
    # Its record names paths as the run did: relative shards from here, as data.tokenizer above.
    buckets = trained_buckets(cfg_path, relative_ok=True)
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
