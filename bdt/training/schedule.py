"""Learning-rate schedules: linear warmup, then constant or cosine decay to a floor.

The schedule is a picklable callable object used by `torch.optim.lr_scheduler.LambdaLR`. LambdaLR
stores the object's attributes (and the base LRs) in its state_dict, and DeepSpeed saves and
restores that state with its checkpoint: the schedule a resume continues with is the saved one's.
The config rules a resume (docs/system.md §2), so the trainers put the config's schedule back
after loading (the tokenizer trainer's `follow_config`) or give LambdaLR a plain function whose
state is not saved (the AR trainer's StageClock.lr_lambda).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "cosine")


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

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1): the very first step already trains, instead of running at lr 0.
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine


def lambda_lr(optimizer: torch.optim.Optimizer, schedule: WarmupSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
