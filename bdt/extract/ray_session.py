"""Ray for the extraction driver, and nothing of it left behind when the driver ends.

Under `ray job submit` (or with RAY_ADDRESS set) the driver joins that cluster and only
disconnects at the end. Otherwise it starts a private local Ray on 127.0.0.1 and owns it: Ray's
processes (GCS, raylet, its agents, the workers) are stopped on every way out the driver
controls: a normal end, an exception, SIGTERM, SIGINT, SIGHUP (turned into SystemExit, so the
shutdown runs), the death of its GCS server or raylet (one line naming it, exit 1: the job's
code for "rerun the same command"). A SIGKILL the driver cannot catch, and Ray's dashboard and
runtime-env agents then outlive it for about a minute (they hang reporting the raylet's death
to the dead GCS; measured with Ray 2.60): a reaper process, in its own session, remembers the
driver's descendants and kills the survivors once the driver is gone. It watches before Ray starts, so a driver killed inside `ray.init`
leaves nothing behind either.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    # Loopback only for a private Ray (without this Ray 2.60 binds the external interface).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # the cluster of `ray job submit` / RAY_ADDRESS: not ours to stop
        try:
            yield
        finally:
            ray.shutdown()
        return
    previous, stopped = {}, []

    def exit_on_signal(signum: int, frame) -> None:
        stopped.append(signum)
        raise SystemExit(128 + signum)

    _start_reaper()
    died: list[str] = []
    watching = threading.Event()
    try:
        try:
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
        except Exception as exc:  # e.g. its raylet died while it started: a traceback otherwise
            died.append(f"Ray did not start ({str(exc).strip().splitlines()[-1][:300]})")
            raise SystemExit(1) from None  # the job's "rerun" code, as for failed units
        previous = {sig: signal.signal(sig, exit_on_signal) for sig in STOP_SIGNALS}
        _watch_ray(died, watching)
        yield
    finally:
        watching.clear()  # before the shutdown: Ray's processes end there
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if died:
            print(f"extract: {died[0]}; rerun the same command to finish", file=sys.stderr)
            raise SystemExit(1)
        if stopped:
            # Raised inside ray.wait/ray.get (where the driver waits) Ray turns it into
            # SystemExit(1), the exit code of failed units: say it was a stop, and exit 128 + N.
            print(f"extract: stopped by {signal.Signals(stopped[0]).name}; rerun the same command "
                  f"to finish", file=sys.stderr)
            raise SystemExit(128 + stopped[0])


def _watch_ray(died: list[str], watching: threading.Event, poll_s: float = 0.5) -> None:
    """Watch the private Ray's GCS server and raylet from a daemon thread until `watching` is
    cleared: once one is gone, say which in `died` and stop the main thread as SIGTERM would.
    Without it Ray's core worker ended the driver silently with exit 1 a minute after its GCS
    died, and a dead raylet failed the units as if their actor had died after its restarts."""
    names = {"gcs_server": "GCS server", "raylet": "raylet"}
    watched = {}
    for proc in psutil.Process().children():
        with contextlib.suppress(psutil.Error):  # a child that just ended is none of them
            if proc.name() in names:
                watched[proc] = names[proc.name()]

    def watch() -> None:
        while watching.is_set():
            for proc, name in watched.items():
                with contextlib.suppress(psutil.Error):  # NoSuchProcess: gone, reaped
                    if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                        continue
                if not watching.is_set():  # cleared meanwhile: the driver's own shutdown
                    return
                died.append(f"Ray's {name} (pid {proc.pid}) died under the job")
                _thread.interrupt_main(signal.SIGTERM)
                return
            time.sleep(poll_s)

    watching.set()
    threading.Thread(target=watch, name="bdt-ray-watch", daemon=True).start()


def _start_reaper() -> None:
    """Start the reaper and return once it watches (it says so on its stdout)."""
    reaper = subprocess.Popen([sys.executable, "-m", "bdt.extract.ray_session", str(os.getpid())],
                              start_new_session=True, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    reaper.stdout.readline()  # b"" if it died: Ray starts anyway, as it would without one
    reaper.stdout.close()


def reap(driver_pid: int, poll_s: float = 0.2) -> None:
    """While the driver runs, remember its descendants (a process that lives less than `poll_s`
    may be missed); once the driver is gone (or a zombie), kill those still running (same pid
    and start time: a reused pid is left alone)."""
    driver = psutil.Process(driver_pid)
    known: dict[int, float] = {}
    print("watching", flush=True)
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            for child in driver.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    known.setdefault(child.pid, child.create_time())
        except psutil.NoSuchProcess:
            break
        time.sleep(poll_s)
    known.pop(os.getpid(), None)
    for pid, started in known.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == started:
                proc.kill()


if __name__ == "__main__":
    reap(int(sys.argv[1]))
