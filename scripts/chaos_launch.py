"""One launch of scripts/chaos_resume.py: started in its own session, signalled (SIGKILL, or
SIGTERM to the whole step or to the launcher alone), waited for, and, after a SIGTERM, judged."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import psutil

SUMMARY = "summary.json"
TRACEBACK = "Traceback (most recent call last):"
# torchrun's agent ends with a traceback of its own SignalException once its ranks ended: the
# launcher reporting the signal it got, no crash
LAUNCHER_STOPPED = re.compile(r"^torch\.distributed\.elastic\.multiprocessing\.api\."
                              r"SignalException: Process \d+ got signal: \d+$", re.M)


class Launch:
    """One launch in its own session (its own process group), output to a log file."""

    def __init__(self, cmd: list[str], log_path: str, env: dict):
        self.log_path = log_path
        self.out = open(log_path, "w")
        self.t0, self.wall0 = time.monotonic(), time.time()
        self.proc = subprocess.Popen(cmd, env=env, cwd=os.path.dirname(log_path),
                                     stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}  # every process of the launch met so far

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def family(self) -> list[psutil.Process]:
        """The launch's live processes: the launcher's descendants (torchrun starts its ranks in
        sessions of their own) and its session's members (the `deepspeed` command's per-node
        launcher and ranks stay there when the command dies), plus every one met before."""
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.proc.pid:
                    self.seen.setdefault(p.pid, p)
            except (OSError, psutil.Error):
                continue
        return [p for p in self.seen.values() if _alive(p)]

    def send(self, sig: int, whole: bool = True) -> None:
        """`sig` to every process of the launch at once (a node going away, or SLURM signalling a
        step), or to the launcher alone (Kubernetes signals a container's first process)."""
        family = self.family() if whole else []
        try:
            if whole:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        except ProcessLookupError:
            pass
        for p in family:
            try:
                if os.getpgid(p.pid) != self.proc.pid:  # the group had it: once each, as SLURM
                    p.send_signal(sig)  # psutil checks the start time: a reused pid is not touched
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass

    def kill(self) -> None:
        """SIGKILL the launch, every process of it, and reap them."""
        self.send(signal.SIGKILL)
        self.proc.wait()
        psutil.wait_procs(list(self.seen.values()), timeout=10)
        self.out.close()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -999
        finally:
            self.out.close()

    def wait_all(self, timeout: float) -> bool:
        """Whether the launcher and every process of the launch ended within `timeout` s."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None and not self.family():
                self.out.close()
                return True
            time.sleep(0.2)
        return False

    def log_tail(self, n: int = 3000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def terminate(launch: Launch, whole: bool, bound: float, again_after: float | None,
              run_dir: str, newest, problems: list) -> str:
    """SIGTERM the launch (`whole`: every process of it; again `again_after` s later unless
    None), wait up to `bound` s for every process to end by itself (else SIGKILL it: a finding),
    and judge what it left (`newest()`: the newest complete checkpoint on disk now)."""
    signalled = time.monotonic()
    launch.send(signal.SIGTERM, whole)
    if again_after is not None:
        time.sleep(again_after)
        launch.send(signal.SIGTERM, whole)
    ended = launch.wait_all(bound - (time.monotonic() - signalled))
    if not ended:
        launch.kill()
    outcome, found = judge_term(launch, run_dir, newest(),
                                time.monotonic() - signalled if ended else None, bound)
    problems += found
    return outcome


def written_since(path: str, since: float) -> bool:
    """Whether `path` exists and was last written at wall-clock time `since` or later."""
    try:
        return os.stat(path).st_mtime >= since
    except OSError:
        return False


def summary_of(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, SUMMARY)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def tracebacks(log: str) -> list[str]:
    """The tracebacks in `log`, each up to its last line (the exception)."""
    out = []
    log = re.sub(r"^\[rank\d+\]: ?", "", log, flags=re.M)  # torchrun's prefix of a rank's error
    for block in log.split(TRACEBACK)[1:]:
        lines = block.splitlines()[1:]
        end = next((i for i, ln in enumerate(lines) if ln and not ln.startswith((" ", "\t"))),
                   len(lines) - 1)  # a blank line: a signal landed in a signal handler
        out.append("\n".join([TRACEBACK, *lines[:end + 1]]))
    return out


def judge_term(launch: Launch, run_dir: str, newest: int | None, took: float | None,
               bound: float) -> tuple[str, list[str]]:
    """What a SIGTERMed launch did (how long it took to end after the signal, None: it had not
    ended `bound` s after it; its exit status and summary) and what is wrong with that: not
    ending, its run lock left behind, a traceback in its log, a summary naming another step than
    the newest complete checkpoint on disk."""
    problems = []
    rc = launch.proc.returncode
    log = open(launch.log_path, errors="replace").read()
    summary = summary_of(run_dir) if written_since(os.path.join(run_dir, SUMMARY),
                                                   launch.wall0) else None
    if took is None:
        problems.append(f"launch still running {bound:.0f} s after the SIGTERM: killed "
                        f"(log {launch.log_path})")
    crashes = [tb for tb in tracebacks(log) if not LAUNCHER_STOPPED.search(tb)]
    if crashes:
        problems.append(f"traceback in {launch.log_path}:\n{crashes[0][:3000]}")
    if took is not None and os.path.lexists(os.path.join(run_dir, "RUN_LOCK")):
        problems.append(f"{launch.log_path}: the launch ended and left its run lock behind")
    if summary is None:
        what = "no summary (stopped before the run lock, or mid-export)"
    elif summary.get("stopped"):
        saved = summary.get("saved_step")
        what = f"stopped, saved step {saved}" if saved is not None else "stopped before step 1"
        if saved is not None and saved != newest:
            problems.append(f"{launch.log_path}: summary says step {saved} was saved, the newest "
                            f"complete checkpoint is {newest}")
    else:
        what = f"finished at step {summary.get('step')}"
    ended = "HUNG" if took is None else f"ended after {took:.1f} s"
    return f"{ended}, rc {rc}, {what}", problems
