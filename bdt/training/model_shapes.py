"""The parameter shapes of the model a run trains, recorded beside its checkpoints (both
trainers): a later start with a differently shaped model is refused naming the first parameter
that differs, before DeepSpeed tries to load (it would fail on every checkpoint, which resume
would report as damage)."""

from __future__ import annotations

import json
import logging

import torch

from bdt import storage
from bdt.training.distributed import DistInfo, barrier

SIGNATURE_NAME = "model_shapes.json"
log = logging.getLogger(__name__)


def model_signature(model: torch.nn.Module) -> dict[str, list[int]]:
    """name -> full shape (ZeRO-3 partitioned parameters report theirs in ds_shape)."""
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}


def check_model_signature(root: str, signature: dict[str, list[int]], dist: DistInfo) -> None:
    """First start: record the model's parameter shapes beside the checkpoints. Later starts:
    refuse checkpoints of a differently shaped model before DeepSpeed tries to load them."""
    url = storage.join(root, SIGNATURE_NAME)
    saved = _recorded_signature(url)
    if saved is not None:
        for name in list(signature) + [n for n in saved if n not in signature]:
            if saved.get(name) != signature.get(name):
                raise ValueError(f"checkpoints in {root} are from a different model shape: parameter "
                                 f"'{name}' is {saved.get(name)} there and {signature.get(name)} in "
                                 f"this config; use a new checkpoint.dir or the original model config")
    elif dist.is_main:
        storage.makedirs(root)
        storage.write_bytes_atomic(url, json.dumps(signature).encode())
    barrier()


def _recorded_signature(url: str) -> dict | None:
    """The shapes recorded at `url`; None when there are none or the file is damaged (it is
    only a guard, written again: DeepSpeed's load still refuses a checkpoint of other shapes)."""
    if not storage.exists(url):
        return None
    try:
        saved = json.loads(storage.read_bytes(url))
        if isinstance(saved, dict):
            return saved
        why = "not a JSON object"
    except ValueError as e:
        why = str(e)
    log.warning("%s is damaged (%s): recording this model's parameter shapes again", url, why)
    return None
