"""scripts/demo.sh stopped by Ctrl-C, SIGTERM or a closed terminal's SIGHUP (to its process group,
or SIGTERM to its PID alone) while a step runs: it exits at once, but only once the step has ended. The `deepspeed`
runner dies at once on either signal while its launcher and ranks still save; here a fake runner
and launcher stand in for them, and a fake `bdt data` for the steps without a trainer (the script
runs in a copy of scripts/ whose .venv/bin holds them). SIGKILLed during extraction, its Ray head
(in a session of its own) is stopped all the same; a fake `ray` stands in for Ray."""

import contextlib
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from testkit import REPO, terminal_job_signals

pytestmark = pytest.mark.slow

# The runner: starts the launcher and waits, dying on either signal (as deepspeed's runner does
# for a local launch). The launcher: on a signal it "saves" for 2 s, then exits 1; it notes each
# signal it gets (a second one, while it saves, would start the save over).
RUNNER = f"""#!{sys.executable}
import subprocess, sys
subprocess.Popen([sys.executable, __file__.replace("deepspeed", "launcher.py")]).wait()
"""
LAUNCHER = """import os, signal, sys, time
def stop(signum=signal.SIGINT, _=None):
    open(os.environ["DEMO_DIR"] + "/signals", "a").write(f"{int(signum)}\\n")
    time.sleep(2)
    open(os.environ["DEMO_DIR"] + "/saved", "w").close()
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGHUP, stop)
open(os.environ["DEMO_DIR"] + "/launcher.pid", "w").write(str(os.getpid()))
time.sleep(60)
"""
# `bdt data shapes`: as the launcher, but Ctrl-C reaches it as Python's KeyboardInterrupt, which a
# SIGINT ignored at its start (bash's for a background job) would never raise. Other commands fail.
BDT = f"""#!{sys.executable}
import os, signal, sys, time
if sys.argv[1] != "data":
    sys.exit(1)
{LAUNCHER.replace("time.sleep(60)", "")}
try:
    time.sleep(60)
except KeyboardInterrupt:
    stop()
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
    for name in ("demo.sh", "local_ray.sh", "run_to_end.py"):
        shutil.copy(REPO / "scripts" / name, root / "scripts" / name)
    bin_dir = root / ".venv" / "bin"
    os.makedirs(bin_dir)
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")  # bdt's venv
    for name, text in (("python", None), ("deepspeed", RUNNER), ("ray", RAY), ("bdt", BDT)):
        if text:
            (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "launcher.py").write_text(LAUNCHER)


@pytest.mark.parametrize("sig, to_group, done", [
    (signal.SIGTERM, True, ["data/manifest.json"]),  # the tokenizer trainer
    (signal.SIGINT, True, list(BEFORE_TRAINING)),  # the AR trainer
    (signal.SIGINT, True, []),  # `bdt data`
    (signal.SIGHUP, True, list(BEFORE_TRAINING)),
    (signal.SIGTERM, False, list(BEFORE_TRAINING)),
    (signal.SIGTERM, False, []),
    (signal.SIGKILL, False, list(BEFORE_TRAINING)),  # the trainer gets a SIGTERM from its death
])
def test_a_stopped_demo_exits_after_its_step(tmp_path, sig, to_group, done):
    """A signal to the group reaches the step directly; one to demo.sh's PID alone (a scheduler's
    or `kill PID`) used to wait for the step's end (bash runs a trap only between commands): the
    demo now passes it on and exits within seconds, once the step has saved. SIGKILLed alone, it
    cannot: the step, which ran on, now stops as on a SIGTERM."""
    fake_repo(tmp_path / "repo")
    demo = tmp_path / "demo"
    for name in done:
        os.makedirs(os.path.dirname(demo / name), exist_ok=True)
        (demo / name).write_text(BEFORE_TRAINING[name])
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    env.update(DEMO_DIR=str(demo), DEMO_DEVICE="cpu")
    proc = subprocess.Popen(["bash", str(tmp_path / "repo" / "scripts" / "demo.sh")], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            preexec_fn=terminal_job_signals)
    try:
        deadline = time.monotonic() + 60
        while not (demo / "launcher.pid").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the step never started"
            time.sleep(0.1)
        time.sleep(0.5)  # the step's processes have set their handlers
        started = psutil.Process(proc.pid).children(recursive=True)
        (os.killpg if to_group else os.kill)(proc.pid, sig)
        killed = sig == signal.SIGKILL
        assert proc.wait(timeout=20) == (-sig if killed else 130)
        if killed:  # nothing waited for the step
            psutil.wait_procs(started, timeout=10)
        assert (demo / "saved").exists(), "the step had not saved (when the demo exited, or 10 s after its death)"
        seen = signal.SIGTERM if killed else sig
        assert (demo / "signals").read_text().split() == [str(int(seen))]  # once, group or PID
        gone, alive = psutil.wait_procs(started, timeout=1)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "left running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_closed_terminal_stops_the_demo_once_its_step_has_saved(tmp_path):
    """The demo's terminal closed (a window, an ssh session) while the AR trainer ran: the demo
    died at once, its step with it, unsaved. The kernel hangs the terminal up and sends SIGHUP to
    the session's leader, here demo.sh itself (in life a shell, which passes it on to its job):
    the step is stopped, saves, and the demo exits 130 once it has, though its writes fail."""
    fake_repo(tmp_path / "repo")
    demo = tmp_path / "demo"
    for name, text in BEFORE_TRAINING.items():
        os.makedirs(os.path.dirname(demo / name), exist_ok=True)
        (demo / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEMO_")}
    env.update(DEMO_DIR=str(demo), DEMO_DEVICE="cpu")
    bash = shutil.which("bash")
    pid, master = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        terminal_job_signals()
        os.execve(bash, [bash, str(tmp_path / "repo" / "scripts" / "demo.sh")], env)
    status, started = None, []
    try:
        deadline = time.monotonic() + 60
        while not (demo / "launcher.pid").exists():  # reading what the demo writes meanwhile
            assert time.monotonic() < deadline, "the step never started"
            if select.select([master], [], [], 0.1)[0]:
                os.read(master, 4096)
        time.sleep(0.5)  # the step's processes have set their handlers
        started = psutil.Process(pid).children(recursive=True)
        os.close(master)
        master = None
        while not (ended := os.waitpid(pid, os.WNOHANG))[0]:
            assert time.monotonic() < deadline + 20, "the demo did not end"
            time.sleep(0.1)
        status = os.waitstatus_to_exitcode(ended[1])
    finally:
        if master is not None:
            os.close(master)
        if status is None:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert status == 130
    assert (demo / "saved").exists(), "the demo exited before its step had saved"
    assert (demo / "signals").read_text().split() == [str(int(signal.SIGHUP))]
    gone, alive = psutil.wait_procs(started, timeout=1)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "left running"


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


def test_a_step_started_as_the_demo_is_killed_never_runs(tmp_path):
    """demo.sh SIGKILLed just after it starts run_to_end.py (as demo.sh does), before that has
    asked for its parent's death signal: the step used to run on, with no demo left to stop it."""
    ran = tmp_path / "ran"
    script = (f'RUN_TO_END_PARENT=$$ {sys.executable} {REPO}/scripts/run_to_end.py "$@" & '
              f'echo $!; kill -KILL $$')
    started = subprocess.run(["bash", "-c", script, "bash", sys.executable, "-c",
                              f"open({str(ran)!r}, 'w').close()"], capture_output=True, text=True)
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(int(started.stdout)).wait(timeout=10)
    assert not ran.exists(), "the step ran after the demo's death"
    # With its parent alive, the step runs.
    subprocess.run(["bash", "-c", script.replace("kill -KILL $$", "wait"), "bash",
                    sys.executable, "-c", f"open({str(ran)!r}, 'w').close()"], check=True)
    assert ran.exists()


def test_a_step_stopped_by_a_signal_reports_it_whatever_its_own_status(tmp_path):
    """Ctrl-C to the demo's group: the step saved and exited 1, and where bash had not run its
    INT trap before `wait` returned (under load, once), `set -e` ended the demo with status 1, as
    a failed step. run_to_end.py now returns 130 for the stop, which demo.sh acts on itself."""
    saved = tmp_path / "saved"
    step = ("import signal, sys, time\n"
            "def stop(*_):\n"
            f"    open({str(saved)!r}, 'w').close()\n"
            "    sys.exit(1)\n"
            "signal.signal(signal.SIGINT, stop)\n"
            "print('ready', flush=True)\n"
            "time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "run_to_end.py"),
                             sys.executable, "-c", step], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=20) == 130 and saved.exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Not stopped, the step's own status comes back.
    assert subprocess.run([sys.executable, str(REPO / "scripts" / "run_to_end.py"), sys.executable,
                           "-c", "raise SystemExit(3)"]).returncode == 3


def test_the_gpu_demo_gives_its_ray_head_a_cpu_per_extraction_actor(tmp_path):
    """On a machine whose torch sees more than 2 GPUs the demo asks for an extraction actor per
    GPU, each taking a CPU too, of a Ray head started with 2 CPUs: the job refused to start
    (run.py's capacity check: 2 actors fit). A fake python sees 8 GPUs, a fake `ray` records."""
    fake_repo(tmp_path / "repo")
    bin_dir = tmp_path / "repo" / ".venv" / "bin"
    (bin_dir / "python").write_text(
        "#!/bin/sh\ncase \"$*\" in *torch.cuda.device_count*) echo 8; exit 0;; esac\n"
        f"exec {sys.executable} \"$@\"\n")
    recording = RAY.replace('demo = os.environ["DEMO_DIR"]\n', 'demo = os.environ["DEMO_DIR"]\n'
                            'open(demo + "/ray_" + sys.argv[1], "w").write(" ".join(sys.argv))\n')
    recording = recording.replace("    time.sleep(60)\nport", "    sys.exit(1)\nport")
    assert recording.count("sys.exit(1)") == 1 and "/ray_" in recording
    (bin_dir / "ray").write_text(recording)
    demo = tmp_path / "demo"
    for name in ("data/manifest.json", "tokenizer/export/config.json"):
        os.makedirs(os.path.dirname(demo / name), exist_ok=True)
        (demo / name).write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_", "RAY_"))}
    env.update(DEMO_DIR=str(demo))
    subprocess.run(["bash", str(tmp_path / "repo" / "scripts" / "demo.sh")], env=env,
                   capture_output=True, timeout=60)  # fails with the (fake) job
    head, job = ((demo / f"ray_{what}").read_text().split() for what in ("start", "job"))
    assert head[head.index("--num-cpus") + 1] == "8"
    assert "num_actors=8" in job and "gpus_per_actor=1" in job


def test_under_nohup_a_hangup_leaves_the_step_running(tmp_path):
    """SIGHUP ignored at the start (`nohup make demo`): the step outlives the terminal. Blocked
    for sigwaitinfo, the ignored signal would still have reached run_to_end.py as a stop."""
    step = "import time; print('ready', flush=True); time.sleep(1.5)"
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "run_to_end.py"),
                             sys.executable, "-c", step], stdout=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        assert proc.stdout.readline() == "ready\n"
        os.killpg(proc.pid, signal.SIGHUP)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
