"""An impatient scheduler signals twice: the second SIGTERM, while a trainer is already stopping
(its summary and run lock release still to come), only sets the stop flag. It once met the
handler the trainer had restored (the default: death), which left the run lock held, no summary
written and the exit status 143 (scripts/chaos_resume.py --signal term found it). Nor may the
second signal meet the start-up's stuck-watch pipe closed (an "Exception ignored ... Broken
pipe" report in the log)."""

import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from bdt.training.distributed import DistInfo
from bdt.training.signals import StoppedBeforeStart


# an error reported from the C-level signal handler (a wakeup pipe without a reader) fails a test
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def _noop(*args, **kwargs):
    return None


class _Lock:
    """A run lock whose release meets the scheduler's second signal."""

    def __init__(self, events: list):
        self.events = events

    def release(self):
        os.kill(os.getpid(), signal.SIGTERM)
        self.events.append("released")


def _stop_in_step(stop, *_):
    """What the loop does at a signal once training: the flag, then a summary of the stop."""
    stop.start()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested
    return {"stopped": True}


def _stop_before_start(*_):
    os.kill(os.getpid(), signal.SIGTERM)  # raises StoppedBeforeStart where it lands


@pytest.fixture
def events():
    """What happened, in order; "killed" where the default handler would have ended the
    process (a stand-in for SIG_DFL, put back afterwards)."""
    got = []
    previous = signal.signal(signal.SIGTERM, lambda *_: got.append("killed"))
    yield got
    signal.signal(signal.SIGTERM, previous)


def _patch_ar(monkeypatch, events, train):
    from bdt.training.ar import loop

    for name in ("resolve_init_from", "validate"):
        monkeypatch.setattr(loop, name, _noop)
    monkeypatch.setattr(loop, "start_checks", SimpleNamespace(
        set_threads=_noop, check_copied_folders=_noop, check_data=_noop,
        check_image_tokenizer=_noop))
    monkeypatch.setattr(loop, "model_build", SimpleNamespace(skip_deepspeed_muon=_noop))
    monkeypatch.setattr(loop, "init_distributed", lambda: DistInfo(0, 1, 0, torch.device("cpu")))
    monkeypatch.setattr(loop, "hold_run_lock", lambda run_dir, dist: _Lock(events))
    monkeypatch.setattr(loop, "_train", lambda cfg, dist, data, in_loop, stop: train(stop))
    return lambda run_dir: loop.run(SimpleNamespace(run_dir=run_dir, threads=1), None)


def _patch_tokenizer(monkeypatch, events, train):
    from bdt.training.tokenizer import loop

    monkeypatch.setattr(loop, "validate", _noop)
    monkeypatch.setattr(loop, "init_distributed", lambda: DistInfo(0, 1, 0, torch.device("cpu")))
    monkeypatch.setattr(loop, "hold_run_lock", lambda run_dir, dist: _Lock(events))
    monkeypatch.setattr(loop, "_train", lambda cfg, model_cfg, dist, on_set_up, stop: train(stop))
    return lambda run_dir: loop.train(SimpleNamespace(run_dir=run_dir))


@pytest.mark.parametrize("patch", [_patch_ar, _patch_tokenizer], ids=["ar", "tokenizer"])
def test_a_second_signal_while_stopping_in_a_step_ends_nothing(tmp_path, monkeypatch, events,
                                                               patch):
    run = patch(monkeypatch, events, _stop_in_step)
    assert run(str(tmp_path)) == {"stopped": True}
    assert events == ["released"]


@pytest.mark.parametrize("patch", [_patch_ar, _patch_tokenizer], ids=["ar", "tokenizer"])
def test_a_second_signal_while_stopping_before_step_1_ends_nothing(tmp_path, monkeypatch,
                                                                   events, patch):
    run = patch(monkeypatch, events, lambda stop: _stop_before_start())
    with pytest.raises(StoppedBeforeStart) as stopped:
        run(str(tmp_path))
    assert events == ["released"] and stopped.value.exit_code == 0
    assert json.loads((tmp_path / "summary.json").read_text())["stopped"] is True
