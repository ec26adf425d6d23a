"""What a SIGKILL of the extraction leaves on disk, recreated directly, and the rerun that must
clean it up (scripts/chaos_extract.py finds these by killing real runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
from extract_rawdata import good_samples, write_tar

from bdt.config import load
from bdt.extract.config import ExtractConfig
from bdt.extract.run import plan

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_temps_of_a_run_killed_while_writing_its_own_files_are_removed_by_the_rerun(tmp_path, tiny_tokenizer):
    """A kill inside write_bytes_atomic of index.json, rejects.jsonl, plan.json or config.yaml
    leaves `.NAME.tmp-*` in the output root, one inside the write check its probe; nothing else
    would ever remove them, so the rerun's output would differ from an uninterrupted run's by a
    half-written file (found by scripts/chaos_extract.py)."""
    write_tar(str(tmp_path / "x.tar"), good_samples("a", 1, 0))
    out = tmp_path / "out"
    out.mkdir()
    stale = [f".{name}.tmp-0123abcd" for name in ("index.json", "rejects.jsonl", "plan.json", "config.yaml")]
    # A kill inside storage.check_writable leaves its probe or the probe's temp file.
    stale += [".bdt-write-probe-0123abcd", "..bdt-write-probe-4567cdef.tmp-89abcdef"]
    for name in stale:
        (out / name).write_bytes(b'{"half')
    unrelated = out / ".notes.tmp-0123abcd"  # not a temp of the run's files: left alone
    unrelated.write_bytes(b"mine")
    plan(load(ExtractConfig, [], [f"inputs={tmp_path}/x.tar", f"output={out}", f"tokenizer={tiny_tokenizer}",
                                  "stages=[{resolution: 32}]"]))
    assert sorted(os.listdir(out)) == sorted(["config.yaml", "plan.json", unrelated.name])


_DRIVER_KILLED_IN_RAY_INIT = """
import subprocess, sys, time
import ray
from bdt.extract.ray_session import ray_session

def starting(*args, **kwargs):  # Ray's start: it spawns its processes, then takes a while
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(child.pid, flush=True)
    time.sleep(120)

ray.init = starting
with ray_session():
    pass
"""


@pytest.mark.slow
def test_a_driver_killed_while_ray_starts_leaves_no_process(tmp_path):
    """The reaper used to start after `ray.init` returned: a driver SIGKILLed while Ray started
    (scripts/chaos_extract.py --kill driver hit it) left Ray's agents running for a minute."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER_KILLED_IN_RAY_INIT], cwd=REPO, env=env,
                              stdout=subprocess.PIPE)
    child = None
    try:
        child = psutil.Process(int(driver.stdout.readline()))
        time.sleep(1.0)  # the reaper has seen it (it looks every 0.2 s)
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 10
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        if driver.poll() is None:
            driver.kill()
        if child is not None and child.is_running():
            child.kill()
