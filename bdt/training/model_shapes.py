"""The parameter shapes of the model a run trains, recorded beside its checkpoints (both
trainers): a later start with a differently shaped model is refused naming the first parameter
that differs, before DeepSpeed tries to load (it would fail on every checkpoint, which resume
would report as damage). A trainer may add config values that shape no parameter but change
what the weights compute (the tokenizer's norm_groups): recorded as `config.<key>`, compared
where the record has them (records from before they were kept have none)."""

from __future__ import annotations

import json
import logging

import torch

from bdt import storage
from bdt.training.distributed import DistInfo, barrier

SIGNATURE_NAME = "model_shapes.json"
log = logging.getLogger(__name__)


CONFIG_PREFIX = "config."


def model_signature(model: torch.nn.Module, config: dict | None = None) -> dict:
    """name -> full shape (ZeRO-3 partitioned parameters report theirs in ds_shape), and
    `config.<key>` -> value for each of `config`."""
    shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    return {**shapes, **{CONFIG_PREFIX + k: v for k, v in (config or {}).items()}}


def check_model_signature(root: str, signature: dict[str, list[int]], dist: DistInfo) -> None:
    """First start: record the model's parameter shapes beside the checkpoints. Later starts:
    refuse checkpoints of a differently shaped model before DeepSpeed tries to load them."""
    url = storage.join(root, SIGNATURE_NAME)
    saved = _recorded_signature(url)
    if saved is not None:
        for name in list(signature) + [n for n in saved if n not in signature]:
            if name.startswith(CONFIG_PREFIX) and name not in saved:
                continue  # recorded before config values were
            if saved.get(name) != signature.get(name):
                what = (f"model.{name[len(CONFIG_PREFIX):]}" if name.startswith(CONFIG_PREFIX)
                        else f"parameter '{name}'")
                raise ValueError(f"checkpoints in {root} are from a different model: {what} is "
                                 f"{saved.get(name)} there and {signature.get(name)} in this "
                                 f"config; use a new checkpoint.dir or the original model config")
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
