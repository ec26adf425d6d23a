"""A step whose loss or gradient norm is not finite ends the run, before anything of it is saved.

Left alone, a diverged run keeps stepping on NaN: DeepSpeed skips the updates ("OVERFLOW!") or
applies them (plain fp32 gradients), the loop saves a checkpoint every `checkpoint.every` steps,
`keep_last` deletes the good ones, and the run exits 0 with an export of garbage. Instead each
rank records the first non-finite value of its step (`StepHealth`), the per-step stop collective
(signals.StopFlag) carries it to every rank, and all ranks raise `TrainingDiverged` at the same
step, naming the rank, the values and the samples of the micro-batch. Nothing of that step is
written, so the newest checkpoint is one whose step was finite; the resume wrapper restarts
from it (a transient fault passes, a deterministic one recurs and the wrapper gives up: no new
checkpoint).

Why stop rather than skip the batch: not every ZeRO/precision setup can skip (with plain fp32
gradients DeepSpeed applies them), and a NaN that comes from the learning rate or the data
recurs at once; Megatron-LM stops the same way by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NoReturn

import torch

from bdt.training.distributed import all_gather_object

MAX_KEYS = 8  # sample keys quoted per report


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm of a step was NaN or infinite on some rank."""


class StepHealth:
    """This rank's first non-finite value in the current step (None while all are finite)."""

    def __init__(self) -> None:
        self.problem: str | None = None

    @property
    def bad(self) -> bool:
        return self.problem is not None

    def check_losses(self, values: dict[str, float], where: str, keys: Sequence[str] = ()) -> None:
        """`values`: the micro-batch's loss terms; `where` says which micro-batch; `keys` are
        its samples (quoted, so that a NaN from the data can be traced to them)."""
        if self.bad or all(math.isfinite(v) for v in values.values()):
            return
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        samples = ""
        if keys:
            more = f" and {len(keys) - MAX_KEYS} more" if len(keys) > MAX_KEYS else ""
            samples = f", samples {', '.join(keys[:MAX_KEYS])}{more}"
        self.problem = f"{where}: {shown}{samples}"

    def check_grad_norm(self, norm: float | None, what: str = "gradient norm") -> None:
        if not self.bad and norm is not None and not math.isfinite(norm):
            self.problem = f"{what} {norm} after a finite loss"

    def reset(self) -> None:
        self.problem = None


def plain_grad_norm(module: torch.nn.Module) -> float:
    """The global norm of `module`'s gradients. DeepSpeed reports the norm from its ZeRO/bf16
    optimizers only; with plain fp32 gradients (ZeRO-0) a trainer reads it here, at the
    accumulation boundary before `engine.step` (the gradients are averaged over ranks then)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def raise_diverged(health: StepHealth, step: int, last_saved: int, hint: str) -> NoReturn:
    """Collective (every rank, once the stop collective said DIVERGED): gather each rank's
    report and raise TrainingDiverged with all of them. `last_saved`: the newest checkpoint's
    step (-1: none); `hint`: what to change before resuming."""
    reports = all_gather_object(health.problem)
    lines = "; ".join(f"rank {r}: {p}" for r, p in enumerate(reports) if p is not None)
    saved = (f"the newest checkpoint is step {last_saved}" if last_saved >= 0
             else "no checkpoint was written")
    raise TrainingDiverged(f"training diverged at step {step}: non-finite values ({lines}). "
                           f"Nothing of this step was saved; {saved}. {hint}")
