"""Fit the last stage to the wall-clock budget (`time_limit_min` with `time_limit_fit`).

A time limit alone stops a run wherever it is: on a machine slower than the config was written
for, mid-decay, at a learning rate far above the schedule's floor. With a fit, the run measures
its step rate once in the last stage and shortens that stage so that its whole schedule, decay
included, ends within the remaining time: the fixed-budget run that ends annealed. (The CPU demo
does not use it: at its compute more steps beat a finished decay; docs/results.md.)

The decision is made once per run, at a fixed step of the last stage, from the slowest rank's
rate, and lives in the stage clock: every checkpoint after it carries it, and a resumed run keeps
it instead of measuring again. A stage is never lengthened (its `steps`/`tokens` are the most
it runs), and the plain time limit stays as the backstop should the machine slow down later.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from bdt.training.ar.stages import StageClock
from bdt.training.distributed import all_reduce_max

# Steps of the last stage (in this process) left out of the rate: the stream's start, first-step
# compiles and allocations. Then the rate is the mean over CALIBRATION_STEPS, checkpoint saves
# and in-loop tasks included when they fall in the window.
WARMUP_STEPS = 10
CALIBRATION_STEPS = 50


class TimeFit:
    def __init__(self, fraction: float, limit_min: float, started: float, clock: StageClock,
                 now: Callable[[], float] = time.monotonic):
        """`fraction` of the time left that the shortened stage may take (the rest absorbs
        saves, export and rate drift); `started`: now() when the budget began."""
        self.on = fraction > 0 and limit_min > 0 and clock.fitted is None
        self.fraction, self.limit_s, self.started = fraction, limit_min * 60, started
        self.last_stage = len(clock.names) - 1
        self.steps_seen = 0
        self.mark = 0.0
        self.now = now

    def after_step(self, clock: StageClock, step: int, device: torch.device) -> dict | None:
        """Collective once it decides (every rank calls it after every step, at the same steps).
        Returns the metrics of the decision at the step it is made, else None."""
        if not self.on or clock.stage != self.last_stage or step <= clock.start_step:
            return None  # (step == start_step: the previous stage's last step just ran)
        self.steps_seen += 1
        if self.steps_seen == WARMUP_STEPS:
            self.mark = self.now()
        if self.steps_seen < WARMUP_STEPS + CALIBRATION_STEPS:
            return None
        self.on = False
        now = self.now()
        step_s = max(all_reduce_max((now - self.mark) / CALIBRATION_STEPS, device), 1e-9)
        left_s = self.limit_s - all_reduce_max(now - self.started, device)
        steps_left = int(self.fraction * left_s / step_s)
        shortened = clock.fit(step, steps_left)
        return {"time_fit/step_s": step_s, "time_fit/left_s": left_s,
                "time_fit/steps_left": steps_left, "time_fit/shortened": float(shortened),
                "time_fit/stage_steps": (clock.step_limits[self.last_stage]
                                         or clock.specs[self.last_stage][2])}
