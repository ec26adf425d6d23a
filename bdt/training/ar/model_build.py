"""The model a training job trains: built whole or straight into ZeRO-3 partitions (from
`init_from`'s export when given), the parameters each rank holds, and digests that show replicas
drifting apart."""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping

import torch

from bdt import storage
from bdt.model.ar import WEIGHTS_NAME, BitDanceModel
from bdt.training.ar.config import TrainConfig


def skip_deepspeed_muon(cfg: TrainConfig) -> None:
    """DeepSpeed's ZeRO-3 code imports its Muon optimizer module at start to recognise that
    optimizer, and that module torch.compiles kernels at import: ~1-3 s of CPU per rank per
    start, for an optimizer the run does not build. A stand-in module whose class nothing is an
    instance of keeps every `from ... import MuonWithAuxAdam` + isinstance check working. Not
    when the run chose Muon (`deepspeed.extra.optimizer.type`): DeepSpeed then builds it."""
    optimizer = dict(cfg.deepspeed.extra).get("optimizer")
    if isinstance(optimizer, Mapping) and str(optimizer.get("type", "")).lower() == "muon":
        return
    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name not in sys.modules:
        stub = types.ModuleType(name, "stand-in: this run does not use DeepSpeed's Muon optimizer")
        stub.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
        sys.modules[name] = stub


def build_model(cfg: TrainConfig, ds_config: dict) -> tuple[BitDanceModel, object | None]:
    """The model, and (under ZeRO-3) the live HfDeepSpeedConfig the caller must keep referenced.

    ZeRO 0-2: built whole on every rank. ZeRO-3: no rank ever holds the whole LLM. A live
    `HfDeepSpeedConfig` makes transformers build and load the LLM inside `deepspeed.zero.Init`,
    straight into each rank's partition (transformers keeps only a weak reference to it: drop
    it and later HF calls stop treating the model as ZeRO-3). The resized embeddings (HF's resize
    makes them whole), connector and head are then partitioned in place with rank 0's values
    (`zero.Init(module=...)`). Those are whole on every rank for that moment: at BitDance-14B
    sizes about 1.6B embedding + 1.8B head parameters next to the 14B that never are (building
    the head inside zero.Init would need its DiT init re-run under a gather: not done).
    """
    if cfg.deepspeed.zero_stage != 3:
        return _initialised(cfg), None
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds_config)
    model = _initialised(cfg)
    if cfg.deepspeed.precision == "bf16":
        # The engine casts nothing of a model partitioned at init (zero.Init already gave the
        # LLM the configured dtype): our own modules must arrive in it. pos_embed holds only
        # a buffer, which stays fp32 as under ZeRO-0-2 (the engine casts parameters only).
        for module in (model.connector, model.pos_embed, model.head):
            module.to(torch.bfloat16)
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)  # skips partitioned params
    return model, hf_ds


def _initialised(cfg: TrainConfig) -> BitDanceModel:
    """The model as configured, its connector and head from the export `init_from` when given
    (the LLM's weights came from its llm/ as the backbone), else freshly initialised."""
    if not cfg.init_from:
        return BitDanceModel.from_config(cfg.model)
    from bdt.weights import read_safetensors

    model = BitDanceModel.from_config(cfg.model, extra_on_meta=True)
    url = storage.join(cfg.init_from, WEIGHTS_NAME)
    model.load_extra(read_safetensors(url), url)
    return model


def local_numel(module: torch.nn.Module) -> int:
    """Parameter elements this rank holds: its ZeRO-3 partitions, or everything."""
    return sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
               for p in module.parameters())


def numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def param_digests(module: torch.nn.Module, zero3: bool) -> list[str]:
    """sha256 of this rank's full parameters, gathered from every rank (collective): replicas
    that drifted apart (a missed all-reduce, a rank-dependent update) show up as different."""
    import hashlib

    h = hashlib.sha256()
    for name, p in module.named_parameters():
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                t = p.detach().float().cpu().contiguous()
        else:
            t = p.detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    digest = h.hexdigest()
    if not torch.distributed.is_initialized():
        return [digest]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, digest)
    return out
