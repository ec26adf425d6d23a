"""The parameter shapes of the model a run trains, recorded beside its checkpoints (both
trainers): a later start with a differently shaped model is refused naming the first parameter
that differs, before DeepSpeed tries to load (it would fail on every checkpoint, which resume
would report as damage). A trainer may add config values that shape no parameter but change
what the weights compute (the tokenizer's norm_groups): recorded as `config.<key>`, compared
where the record has them (records from before they were kept have none)."""

from __future__ import annotations

import hashlib
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


def text_vocab(tokenizer) -> dict[str, str]:
    """The text tokenizer's vocabulary as a config value of the signature ({} without one): an
    LLM of the same shapes with another tokenizer passed the shape check, and its token ids then
    indexed embeddings the checkpoint trained for other tokens (its own weights are not loaded)."""
    if tokenizer is None:
        return {}
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()[:16]
    return {"backbone.path's text tokenizer": f"{len(vocab)} tokens, sha256 {digest}"}


def check_model_signature(root: str, signature: dict[str, list[int]], dist: DistInfo) -> None:
    """Refuse checkpoints of a differently shaped model before DeepSpeed tries to load them, when
    the root has a record (record_model_signature writes it)."""
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
    barrier()


def record_model_signature(root: str, signature: dict[str, list[int]], dist: DistInfo) -> None:
    """Rank 0, once the run has resumed (or found nothing to resume): record the shapes where the
    root has no record, or a damaged one. Not before: with checkpoints there, a record written
    from a config they do not fit would refuse the right config at the next start."""
    url = storage.join(root, SIGNATURE_NAME)
    if dist.is_main and _recorded_signature(url, quiet=True) is None:
        storage.makedirs(root)
        storage.write_bytes_atomic(url, json.dumps(signature).encode())


def _recorded_signature(url: str, quiet: bool = False) -> dict | None:
    """The shapes recorded at `url`; None when there are none or the file is damaged (it is
    only a guard, written again: DeepSpeed's load still refuses a checkpoint of other shapes)."""
    if not storage.exists(url, "reading"):
        return None
    try:
        saved = json.loads(storage.read_bytes(url, "reading"))
        if isinstance(saved, dict):
            return saved
        why = "not a JSON object"
    except (ValueError, RecursionError) as e:  # RecursionError: nested past the parser
        why = str(e)
    if not quiet:
        log.warning("%s is damaged (%s): this model's parameter shapes are recorded again once "
                    "the run has resumed", url, why)
    return None
