"""Learning-rate schedules: linear warmup, then constant or cosine decay to a floor, and the one
scheduler both trainers give DeepSpeed.

`ConfigLR` multiplies the optimizer's configured LR by a function of the step. Its state is the
step position only: the config rules a resume (docs/system.md §2), so a resumed run continues
at the saved step with the config's LRs, stage lengths and schedule. DeepSpeed's
`load_checkpoint` restores the optimizer's param groups, their `lr`, betas, eps and weight decay
included, after the scheduler under ZeRO-1/2 and the universal load, so a trainer calls
`write_lrs()` once its position is restored: the first resumed step then runs at the config's
LR and optimizer hyperparameters too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "cosine")
# What optim.* sets in a param group besides the LR. Named, not every key: some optimizers keep
# state in their groups (DeepSpeed's fused Adam its step), which must come from the checkpoint.
HYPERPARAMETERS = ("betas", "eps", "weight_decay")


@dataclass
class WarmupSchedule:
    """Multiplier on the base LR for optimizer step `step` (0-based)."""

    warmup_steps: int
    total_steps: int
    kind: str = "cosine"
    min_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"optim.schedule: expected one of {SCHEDULES}, got '{self.kind}'")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(f"optim: need warmup_steps >= 0 and total steps >= 1, got "
                             f"{self.warmup_steps} and {self.total_steps}")

    def __call__(self, step: float) -> float:
        """`step` may be fractional (a stage counted in tokens measures its position in steps'
        worth of tokens)."""
        if step < self.warmup_steps:
            # (step + 1): the very first step already trains, instead of running at lr 0;
            # capped at 1, which a fractional step just below warmup_steps would pass.
            return min(1.0, (step + 1) / self.warmup_steps)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine


class ConfigLR(torch.optim.lr_scheduler.LRScheduler):
    """LR of step `n` (0-based) = each group's LR when built (the config's) x `multiplier(n)`.

    `state_dict()` is the position only; `load_state_dict` also reads the LambdaLR state that
    earlier checkpoints hold (its `last_epoch`, the same position), ignoring their saved LRs
    and schedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier: Callable[[int], float]):
        self.multiplier = multiplier
        # The config's hyperparameters as built: a checkpoint's param groups (loaded after this)
        # bring back the saved ones, which a resumed run with an edited optim.* silently kept.
        self.hyperparameters = [{k: group[k] for k in HYPERPARAMETERS if k in group}
                                for group in optimizer.param_groups]
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [base_lr * self.multiplier(self.last_epoch) for base_lr in self.base_lrs]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self.write_lrs()

    def write_lrs(self) -> None:
        """Set the optimizer's LRs to the current position's and its other hyperparameters to
        the config's (after a resume: see the module doc)."""
        self._last_lr = self.get_lr()
        for group, lr, hyper in zip(self.optimizer.param_groups, self._last_lr,
                                    self.hyperparameters, strict=True):
            group.update(hyper, lr=lr)
