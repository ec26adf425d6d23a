"""scripts/demo.sh stopped by Ctrl-C or SIGTERM (to its process group) while a trainer runs: it
exits only once the trainer's launcher has ended. The `deepspeed` runner dies at once on either
signal while its launcher and ranks still save; here a fake runner and launcher stand in for them
(the script runs in a copy of scripts/ whose .venv/bin holds them). SIGKILLed during extraction,
its Ray head (in a session of its own) is stopped all the same; a fake `ray` stands in for Ray."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from testkit import REPO

pytestmark = pytest.mark.slow

# The runner: starts the launcher and waits, dying on either signal (as deepspeed's runner does
# for a local launch). The launcher: on a signal it "saves" for 2 s, then exits 1.
RUNNER = f"""#!{sys.executable}
import subprocess, sys
subprocess.Popen([sys.executable, __file__.replace("deepspeed", "launcher.py")]).wait()
"""
LAUNCHER = """import os, signal, sys, time
def stop(*_):
    time.sleep(2)
    open(os.environ["DEMO_DIR"] + "/saved", "w").close()
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
open(os.environ["DEMO_DIR"] + "/launcher.pid", "w").write(str(os.getpid()))
time.sleep(60)
"""
# `ray start --head --block`: answers HTTP on its dashboard port, with a child as Ray's processes;
# `ray job submit`: runs until killed.
RAY = f"""#!{sys.executable}
import http.server, os, subprocess, sys, time
demo = os.environ["DEMO_DIR"]
if sys.argv[1] == "job":
    open(demo + "/submitted", "w").close()
    time.sleep(60)
port = int(sys.argv[sys.argv.index("--dashboard-port") + 1])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(demo + "/head.pids", "w").write(f"{{os.getpid()}} {{child.pid}}")
http.server.HTTPServer(("127.0.0.1", port), http.server.BaseHTTPRequestHandler).serve_forever()
"""
# What marks steps 1-4 done, for a demo that is to start at step 5 (the AR trainer).
BEFORE_TRAINING = {"data/manifest.json": "{}", "tokenizer/export/config.json": "{}",
                   "tokens/index.json": '{"complete": true}', "llm/model.safetensors": ""}


def fake_repo(root):
    os.makedirs(root / "scripts")
    for name in ("demo.sh", "local_ray.sh"):
        shutil.copy(REPO / "scripts" / name, root / "scripts" / name)
    bin_dir = root / ".venv" / "bin"
    os.makedirs(bin_dir)
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")  # bdt's venv
    for name, text in (("python", None), ("deepspeed", RUNNER), ("ray", RAY)):
        if text:
            (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "launcher.py").write_text(LAUNCHER)


@pytest.mark.parametrize("sig, done", [(signal.SIGTERM, ["data/manifest.json"]),
                                       (signal.SIGINT, list(BEFORE_TRAINING))])
def test_a_stopped_demo_exits_after_its_trainer(tmp_path, sig, done):
    """SIGTERM in step 2 (the tokenizer trainer), Ctrl-C in step 5 (the AR trainer)."""
    fake_repo(tmp_path / "repo")
    demo = tmp_path / "demo"
    for name in done:
        os.makedirs(os.path.dirname(demo / name), exist_ok=True)
        (demo / name).write_text(BEFORE_TRAINING[name])
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    env.update(DEMO_DIR=str(demo), DEMO_DEVICE="cpu")
    proc = subprocess.Popen(["bash", str(tmp_path / "repo" / "scripts" / "demo.sh")], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (demo / "launcher.pid").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the launcher never started"
            time.sleep(0.1)
        launcher = psutil.Process(int((demo / "launcher.pid").read_text()))
        os.killpg(proc.pid, sig)
        assert proc.wait(timeout=30) == 130
        assert (demo / "saved").exists(), "the demo exited while its trainer was still saving"
        assert not launcher.is_running() or launcher.status() == psutil.STATUS_ZOMBIE
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_demo_killed_during_extraction_leaves_no_ray_head(tmp_path):
    fake_repo(tmp_path / "repo")
    demo = tmp_path / "demo"
    for name in ("data/manifest.json", "tokenizer/export/config.json"):
        os.makedirs(os.path.dirname(demo / name), exist_ok=True)
        (demo / name).write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_", "RAY_"))}
    env.update(DEMO_DIR=str(demo), DEMO_DEVICE="cpu")
    proc = subprocess.Popen(["bash", str(tmp_path / "repo" / "scripts" / "demo.sh")], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL)
    head = []
    try:
        deadline = time.monotonic() + 60
        while not (demo / "submitted").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no job was submitted"
            time.sleep(0.1)
        head = [psutil.Process(int(pid)) for pid in (demo / "head.pids").read_text().split()]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(head, timeout=10)
        assert not alive, "the Ray head outlived the demo"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in head:
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_ar_training_gets_what_is_left_of_the_demos_30_minutes(tmp_path):
    """The AR trainer's fixed 19-minute cap took the demo past 30 minutes with the install on a
    loaded machine (its tokenizer capped at 7): it now gets the time the steps before it left,
    counted from `make demo`'s start, less a 2-minute reserve for what follows it."""
    fake_repo(tmp_path / "repo")
    demo = tmp_path / "demo"
    for name, text in BEFORE_TRAINING.items():
        os.makedirs(os.path.dirname(demo / name), exist_ok=True)
        (demo / name).write_text(text)
    runner = tmp_path / "repo" / ".venv" / "bin" / "deepspeed"  # records its arguments, exits 0
    runner.write_text(f"#!{sys.executable}\nimport os, sys\n"
                      "open(os.environ['DEMO_DIR'] + '/args', 'w').write('\\n'.join(sys.argv))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    env.update(DEMO_DIR=str(demo), DEMO_DEVICE="cpu", DEMO_STARTED=str(int(time.time()) - 20 * 60))
    subprocess.run(["bash", str(tmp_path / "repo" / "scripts" / "demo.sh")], env=env,
                   capture_output=True, timeout=60)  # fails after training: no `bdt` here
    limits = [a for a in (demo / "args").read_text().split("\n") if a.startswith("time_limit_min=")]
    assert len(limits) == 1 and 7.0 <= float(limits[0].split("=")[1]) <= 8.0  # 1 min of slack
