"""Progressive stages as one run: which stage a global step is in, and one LR schedule for all.

Stage i owns global optimizer steps [start_i, end_i). The LR is one LambdaLR over the whole run
whose optimizer base LR is 1.0 and whose multiplier is the absolute LR of the stage's own
warmup + constant/cosine schedule at the step's offset inside the stage: a stage switch needs no
new scheduler, and DeepSpeed's checkpoint of the LambdaLR restores the position on resume.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from bdt.trainer.schedule import WarmupSchedule
from bdt.trainer.train_config import StageConfig, stage_steps


@dataclass
class StagePlan:
    names: list[str]
    starts: list[int]  # first global step of each stage
    ends: list[int]  # one past its last step

    @classmethod
    def build(cls, stages: list[StageConfig], grad_accum: int, world_size: int) -> StagePlan:
        starts, ends, at = [], [], 0
        for s in stages:
            starts.append(at)
            at += stage_steps(s, grad_accum, world_size)
            ends.append(at)
        return cls([s.name for s in stages], starts, ends)

    @property
    def total_steps(self) -> int:
        return self.ends[-1]

    def stage_of(self, step: int) -> int:
        """Index of the stage that runs global step `step` (0-based, < total_steps)."""
        return min(bisect.bisect_right(self.starts, step) - 1, len(self.starts) - 1)


class StagedLR:
    """LambdaLR multiplier = absolute LR at a global step. Plain data only in its __dict__ (LambdaLR
    checkpoints that dict with DeepSpeed's torch.save)."""

    def __init__(self, stages: list[StageConfig], plan: StagePlan):
        self.starts = list(plan.starts)
        self.specs = [[float(s.lr), int(s.warmup_steps), plan.ends[i] - plan.starts[i],
                       str(s.schedule), float(s.min_lr_ratio)]
                      for i, s in enumerate(stages)]
        for spec in self.specs:  # validate once, with the schedule's own error messages
            WarmupSchedule(spec[1], spec[2], spec[3], spec[4])

    def __call__(self, step: int) -> float:
        i = max(0, min(bisect.bisect_right(self.starts, step) - 1, len(self.starts) - 1))
        lr, warmup, total, kind, floor = self.specs[i]
        return lr * WarmupSchedule(warmup, total, kind, floor)(step - self.starts[i])
