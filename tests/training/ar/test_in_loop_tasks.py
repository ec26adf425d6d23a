"""How the AR loop runs its in-loop tasks (bdt.training.ar.tasks): the stop point a task calls
before each image batch, and what the loop does when it cuts a task. The ranks' agreement on
the cut batch runs under processes in test_stop_during_eval.py."""

import contextlib

import pytest
import torch

from bdt.training.ar.tasks import TaskCut, run_due, stop_point
from bdt.training.signals import StopFlag

CPU = torch.device("cpu")


class _Task:
    """A task of `batches` batches, due every step; the stop flag is set once batch `signal_at`
    is made (a signal arriving during the task)."""

    def __init__(self, name: str, batches: int, flag: StopFlag, together: bool,
                 signal_at: int = -1):
        self.name, self.batches, self.flag, self.together = name, batches, flag, together
        self.signal_at, self.made = signal_at, []

    def due(self, step: int) -> bool:
        return True

    def run(self, step, module, point) -> dict[str, float]:
        for k in range(self.batches):
            point(self.together)
            self.made.append(k)
            if k == self.signal_at:
                self.flag.requested = True
        return {f"{self.name}_score": 1.0}


class _Logger:
    def __init__(self):
        self.records = []

    def log(self, step, metrics):
        self.records.append((step, metrics))


def _weights(events: list):
    @contextlib.contextmanager
    def swapped():
        events.append("in")
        try:
            yield torch.nn.Linear(1, 1)
        finally:
            events.append("out")
    return swapped


@pytest.mark.parametrize("together", [True, False])
def test_a_signal_during_a_task_ends_it_at_its_next_batch_and_the_rest_do_not_run(together):
    flag = StopFlag(signals=())
    evaluation = _Task("eval", 5, flag, together, signal_at=1)
    preview = _Task("preview", 1, flag, together=False)
    logger, events = _Logger(), []
    cut = run_due([evaluation, preview], 7, _weights(events), logger,
                  stop_point(flag, CPU, armed=True))
    assert cut is evaluation and evaluation.made == [0, 1] and preview.made == []
    assert logger.records == [] and events == ["in", "out"]  # the live weights are back


def test_without_a_signal_every_due_task_runs_and_logs():
    flag = StopFlag(signals=())
    tasks = [_Task("eval", 3, flag, together=True), _Task("preview", 1, flag, together=False)]
    logger = _Logger()
    assert run_due(tasks, 4, _weights([]), logger, stop_point(flag, CPU, armed=True)) is None
    assert logger.records == [(4, {"eval_score": 1.0}), (4, {"preview_score": 1.0})]


def test_once_the_step_is_saved_a_stop_cuts_no_task():
    """A stop seen at the step saved it before the tasks: they may use the rest of the grace
    period, and record what they finish."""
    flag = StopFlag(signals=())
    flag.requested = True
    task = _Task("eval", 3, flag, together=True)
    logger = _Logger()
    assert run_due([task], 5, _weights([]), logger, stop_point(flag, CPU, armed=False)) is None
    assert task.made == [0, 1, 2] and logger.records == [(5, {"eval_score": 1.0})]


def test_the_stop_point_raises_on_this_ranks_flag_alone_or_the_agreed_one():
    flag = StopFlag(signals=())
    point = stop_point(flag, CPU, armed=True)
    point(True)
    point(False)
    flag.requested = True
    for together in (True, False):
        with pytest.raises(TaskCut):
            point(together)
