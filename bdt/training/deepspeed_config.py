"""Typed optimisation settings -> a DeepSpeed config dict, and engine construction.

Users set ZeRO stage, precision, batch, accumulation and AdamW hyper-parameters in the YAML; the
DeepSpeed JSON is derived here so the common cases never need a hand-written DS file. Keys in
`deepspeed.extra` are merged last (deeply) for anything not covered.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bdt.training.distributed import disable_deepspeed_shm_op
from bdt.training.schedule import SCHEDULES, ConfigLR, WarmupSchedule

PRECISIONS = ("fp32", "bf16")
# DeepSpeed keys a typed field sets: the trainers read the field (their micro-batch loop, input
# dtypes, the checkpoint's settings), so `extra` must not tell DeepSpeed otherwise.
OWNED_KEYS = {"bf16": "precision", "fp16": "precision", "amp": "precision",
              "gradient_accumulation_steps": "grad_accum", "train_batch_size": "grad_accum",
              "train_micro_batch_size_per_gpu": "micro_batch_size"}


@dataclass
class OptimConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95  # method §5: AdamW (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_steps: int = 100
    schedule: str = "cosine"  # constant | cosine
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr

    def validate(self, with_schedule: bool = True) -> None:
        """Raise ValueError naming the first bad key; `with_schedule` False skips lr, warmup and
        schedule (the AR trainer's stages carry their own). NaN fails every range, so it is
        refused too."""
        rules = [("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
                 ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
                 ("eps", 0 < self.eps < math.inf, "> 0"),
                 ("weight_decay", 0 <= self.weight_decay < math.inf, ">= 0"),
                 ("grad_clip", 0 <= self.grad_clip < math.inf, ">= 0 (0 = off)")]
        if with_schedule:
            rules += [("lr", 0 <= self.lr < math.inf, "a finite number >= 0"),
                      ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                      ("schedule", self.schedule in SCHEDULES, f"one of {list(SCHEDULES)}"),
                      ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]")]
        for key, ok, expected in rules:
            if not ok:
                raise ValueError(f"optim.{key} must be {expected}, got {getattr(self, key)!r}")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16
    micro_batch_size: int = 8  # per rank
    grad_accum: int = 1
    # Extra DeepSpeed keys merged over the generated dict (e.g. {"zero_optimization":
    # {"overlap_comm": true}}).
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, with_micro_batch: bool = True) -> None:
        """Raise ValueError naming the key; `with_micro_batch` False for the AR trainer, which
        ignores micro_batch_size (a micro-batch is one packed row)."""
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"deepspeed.precision: expected one of {PRECISIONS}, got "
                             f"'{self.precision}'")
        if self.zero_stage == 0 and self.precision == "bf16":
            raise ValueError("deepspeed.precision=bf16 needs deepspeed.zero_stage 1-3: DeepSpeed's "
                             "ZeRO-0 bf16 optimizer steps AdamW once on zero gradients when it is "
                             "built (weight decay at the base LR, Adam's bias correction a step "
                             "off); ZeRO-1 keeps the same weights and gradients on each rank")
        owned = [(f"extra.{k}", field) for k, field in OWNED_KEYS.items() if k in self.extra]
        if "stage" in (self.extra.get("zero_optimization") or {}):
            owned.append(("extra.zero_optimization.stage", "zero_stage"))
        if owned:
            key, field_name = owned[0]
            raise ValueError(f"deepspeed.{key}: set deepspeed.{field_name} instead (the trainers "
                             f"follow it: their micro-batch loop, dtypes and checkpoint settings)")
        if self.grad_accum < 1 or (with_micro_batch and self.micro_batch_size < 1):
            raise ValueError(f"deepspeed: micro_batch_size and grad_accum must be >= 1, got "
                             f"{self.micro_batch_size} and {self.grad_accum}")


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_ds_config(ds: DeepSpeedConfig, optim: OptimConfig, world_size: int) -> dict:
    """The DeepSpeed config for one engine (validated with errors naming the key)."""
    DeepSpeedConfig.validate(ds)  # unbound: `ds` may be the loaded omegaconf node
    adam: dict[str, Any] = {"lr": optim.lr, "betas": [optim.beta1, optim.beta2], "eps": optim.eps,
                            "weight_decay": optim.weight_decay}
    offload = ((ds.extra.get("zero_optimization") or {}).get("offload_optimizer") or {})
    if not torch.cuda.is_available() or offload.get("device", "none") == "none":
        # torch's AdamW: DeepSpeed's own JIT-compiles an extension at start, its fused CPU Adam
        # (~45 s, environment.md) or on a GPU its FusedAdam, which needs a CUDA compiler the
        # machine may lack (scripts/offline_wheels.py). An optimizer offloaded to the CPU is
        # DeepSpeed's CPUAdam: it refuses any other.
        adam["torch_adam"] = True
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": ds.micro_batch_size * ds.grad_accum * world_size,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 10**9,  # our metrics logger reports; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if optim.grad_clip > 0:
        cfg["gradient_clipping"] = optim.grad_clip
    return _deep_merge(cfg, dict(ds.extra))


def make_schedule(optim: OptimConfig, total_steps: int) -> WarmupSchedule:
    return WarmupSchedule(warmup_steps=optim.warmup_steps, total_steps=total_steps,
                          kind=optim.schedule, min_ratio=optim.min_lr_ratio)


def initialize_engine(model: torch.nn.Module, ds_config: dict,
                      schedule: Callable[[int], float]):
    """`deepspeed.initialize` with a ConfigLR of `schedule` (a multiplier of the config's LR);
    returns the engine.

    The scheduler is passed as a callable so it wraps the optimizer DeepSpeed builds from the
    config; the engine steps it once per optimizer step and checkpoints its position.
    """
    disable_deepspeed_shm_op()
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, config=ds_config,
        lr_scheduler=lambda opt: ConfigLR(opt, schedule))
    return engine
