"""The extraction driver's private Ray does not outlive it, even when the driver is SIGKILLed
(without bdt/extract/ray_session.py's reaper, Ray 2.60's dashboard and runtime-env agents hang
on for about a minute, reparented to init)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from extract_rawdata import good_samples, write_tar

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sigkilled_driver_leaves_no_ray_process(tmp_path, tiny_tokenizer):
    for i in range(2):
        write_tar(str(tmp_path / f"raw-{i}.tar"), good_samples(f"d{i}", 40, 10 * i))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "pipelines/extract_tokens.py", "--config", "configs/extract/shapes.yaml",
           f"inputs={tmp_path}/raw-*.tar", f"output={tmp_path}/out", f"tokenizer={tiny_tokenizer}",
           "min_side=16", "stages=[{resolution: 32}]", "batch_size=1", "num_actors=1"]
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "driver.log", "wb"))
    started: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and driver.poll() is None:
            for proc in psutil.Process(driver.pid).children(recursive=True):
                started.setdefault(proc.pid, proc)
            names = " ".join(_name(p) for p in started.values())
            if "ShardEncoder" in names and "DashboardAgent" in names and "RuntimeEnvAgent" in names:
                break
            time.sleep(0.2)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-2000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        alive = _alive(started.values())
        deadline = time.monotonic() + 20  # the agents alone would stay ~60 s
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = _alive(alive)
        assert not alive, [_name(p) for p in alive]
    finally:
        for proc in [*_alive(started.values())]:
            proc.kill()
        if driver.poll() is None:
            driver.kill()


def _name(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:80]
    except psutil.Error:
        return ""


def _alive(procs) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            pass
    return out


_DRIVER_WAITING_ON_RAY = """
import ray
from bdt.extract.ray_session import ray_session

with ray_session():
    ref = ray.remote(lambda: __import__("time").sleep(120)).remote()
    print("waiting", flush=True)
    ray.get(ref)
"""


def test_a_driver_stopped_while_it_waits_on_ray_exits_with_the_signal(tmp_path):
    """Before: SIGTERM or SIGINT (Ctrl-C) reaching the driver inside ray.wait/ray.get, where it
    spends its time, ended it silently with exit code 1, the code of failed units: Ray turns the
    handler's SystemExit(128 + N) into SystemExit(1)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER_WAITING_ON_RAY], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=open(tmp_path / "driver.log", "wb"))
    try:
        assert driver.stdout.readline() == b"waiting\n", (tmp_path / "driver.log").read_text()[-2000:]
        time.sleep(1.0)  # inside ray.get
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=60) == 128 + signal.SIGTERM
        assert "extract: stopped by SIGTERM" in (tmp_path / "driver.log").read_text()
    finally:
        if driver.poll() is None:
            driver.kill()


_DRIVER_ON_RAY = """
import sys, ray
from bdt.extract.ray_session import ray_session

with ray_session():
    ref = ray.remote(lambda: __import__("time").sleep(120)).remote()
    if sys.argv[1] != "none":
        print("waiting", flush=True)
        ray.get(ref)
"""


@pytest.mark.parametrize("victim", ["raylet", "gcs_server", "none"])
def test_a_dead_ray_process_ends_the_driver_at_once_with_one_line(tmp_path, victim):
    """Before: a SIGKILLed GCS server left the driver waiting a minute, then Ray's core worker
    ended it silently with exit 1; a SIGKILLed raylet took the actor along some seconds later
    and failed its units as "actor died after 3 restarts". Now one line names it, exit 1 (the
    job's "rerun" code; and a driver that ends normally is not taken for one whose Ray died in
    its own shutdown)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER_ON_RAY, victim], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=open(tmp_path / "driver.log", "wb"))
    try:
        if victim == "none":
            assert driver.wait(timeout=60) == 0
            assert "died" not in (tmp_path / "driver.log").read_text()
            return
        assert driver.stdout.readline() == b"waiting\n", (tmp_path / "driver.log").read_text()[-2000:]
        proc = next(p for p in psutil.Process(driver.pid).children() if p.name() == victim)
        proc.kill()
        assert driver.wait(timeout=30) == 1
        name = "raylet" if victim == "raylet" else "GCS server"
        assert f"extract: Ray's {name} (pid {proc.pid}) died under the job" in (tmp_path / "driver.log").read_text()
    finally:
        if driver.poll() is None:
            driver.kill()


_RAY_FAILS_TO_START = """
import ray
from bdt.extract.ray_session import ray_session

def starting(*args, **kwargs):  # what ray.init raises when its raylet was killed as it started
    raise Exception("The current node timed out during startup. This could happen because ...")

ray.init = starting
with ray_session():
    pass
"""


def test_ray_failing_to_start_is_one_line(tmp_path):
    """Before: a traceback and exit 1 (found by SIGKILLing the raylet inside `ray.init`)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", _RAY_FAILS_TO_START], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "extract: Ray did not start (The current node timed out during startup. This could happen "
        "because ...); rerun the same command to finish"]
