"""In-loop tasks (sample grids, evaluation) as the AR loop runs them, and the stop point that ends
one at its next image batch when a stop signal arrives while it runs: a whole-suite evaluation
takes minutes at scale, longer than a cluster's grace period after SIGTERM (often 30 s), and the
step it follows must be saved within it (system §2, Signals)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from bdt.training.metrics import MetricsLogger
from bdt.training.signals import STOP_SIGNAL, StopFlag

# What a task calls before each image batch: `stop_point(together)` raises TaskCut when the run
# stops. together=True where every rank of the process group calls it at the same batches (one
# all-reduce decides for all of them, so none goes on alone into the next collective); False
# where this rank generates alone (rank 0's previews under ZeRO 0-2).
StopPoint = Callable[[bool], None]


class InLoopTask(Protocol):
    """Work on the weights being trained every few steps (sample grids, evaluation). The loop
    does not know how: generation sits a layer above it, so the caller builds the tasks
    (bdt/train.py) and the loop runs the due ones with the EMA weights swapped in."""

    def due(self, step: int) -> bool: ...

    def run(self, step: int, module: torch.nn.Module, stop_point: StopPoint) -> dict[str, float]:
        """Metrics to log at `step` ({} for none). Calls `stop_point` before each batch of
        images; what it raises ends the task with nothing written (its report is staged)."""

    def check(self, model: torch.nn.Module) -> None:
        """ValueError, before the first step, for what would fail when the task is first due
        (a prompt beyond the model's context): steps since the last checkpoint would be lost."""


class TaskCut(Exception):
    """A stop signal reached the ranks while an in-loop task ran, before its step was saved."""


def stop_point(stop: StopFlag, device: torch.device, armed: bool) -> StopPoint:
    """The stop point of one step's tasks. Not `armed` once the step is saved (a stop seen at the
    step saves before its tasks): they may then use what is left of the grace period."""
    def check(together: bool) -> None:
        if armed and (stop.should_stop(device) == STOP_SIGNAL if together else stop.signalled()):
            raise TaskCut
    return check


def run_due(tasks: Sequence[InLoopTask], step: int,
            weights: Callable[[], contextlib.AbstractContextManager[torch.nn.Module]],
            logger: MetricsLogger, point: StopPoint) -> InLoopTask | None:
    """Run the tasks due at `step` in turn on `weights()` and log their metrics. Returns the task
    a stop cut (it records nothing: a subset of the suite would score otherwise than the whole,
    and read as a step's score), after which none runs; None when all ran."""
    for task in tasks:
        if not task.due(step):
            continue
        try:
            with weights() as module:
                metrics = task.run(step, module, point)
        except TaskCut:
            return task
        if metrics:
            logger.log(step, metrics)
    return None
