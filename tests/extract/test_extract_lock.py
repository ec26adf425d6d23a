"""One extraction at a time per output: a second run fails naming the first and writes nothing;
the lock of a killed run is taken over by the rerun."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import psutil
import pytest
from extract_rawdata import good_samples, write_tar

from bdt.config import load
from bdt.extract import manifest as mf
from bdt.extract.config import ExtractConfig
from bdt.extract.run import run


def test_a_second_run_into_a_locked_output_fails_before_any_work(tmp_path, tiny_tokenizer):
    write_tar(str(tmp_path / "x.tar"), good_samples("a", 1, 0))
    out = tmp_path / "out"
    cfg = load(ExtractConfig, [], [f"inputs={tmp_path}/x.tar", f"output={out}", f"tokenizer={tiny_tokenizer}"])
    with mf.output_lock(str(out)):
        with pytest.raises(ValueError, match="another extraction is writing this output"):
            run(cfg)
        assert sorted(p.name for p in out.iterdir()) == ["lock.json"]  # no plan, no config
    assert not (out / "lock.json").exists()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(dead.pid).create_time()  # still a zombie until waited for
    dead.wait()
    (tmp_path / "lock.json").write_bytes(mf.json_bytes({"host": socket.gethostname(), "pid": dead.pid,
                                                        "pid_start": started}))
    with mf.output_lock(str(tmp_path)):
        assert json.loads((tmp_path / "lock.json").read_text())["pid"] == psutil.Process().pid


def test_a_run_stopped_before_any_output_leaves_no_folder_it_made(tmp_path, tiny_tokenizer):
    """The lock is taken before planning; a config error found then left an empty output folder
    (and its parents) behind. Only the folders this run made go, and only while empty."""
    from bdt.extract.run import plan

    write_tar(str(tmp_path / "x.tar"), good_samples("a", 1, 0))

    def plan_into(out, *extra):
        cfg = load(ExtractConfig, [], [f"inputs={tmp_path}/x.tar", f"output={out}",
                                       f"tokenizer={tiny_tokenizer}", *extra])
        with pytest.raises(ValueError, match="not a multiple of"), mf.output_lock(str(out)):
            plan(cfg)

    plan_into(tmp_path / "new" / "a" / "tokens", "stages=[{resolution: 30}]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tar"]
    (tmp_path / "mine").mkdir()  # the user's empty folder stays, as do the parents one had
    plan_into(tmp_path / "mine", "stages=[{resolution: 30}]")
    plan_into(tmp_path / "mine" / "sub" / "tokens", "stages=[{resolution: 30}]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "x.tar"]
    assert list((tmp_path / "mine").iterdir()) == []
    # A folder the run made that holds more than the lock (here: the user's file) stays.
    out = tmp_path / "held"
    with pytest.raises(RuntimeError), mf.output_lock(str(out)):
        (out / "notes.txt").write_text("kept")
        raise RuntimeError("stopped")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
