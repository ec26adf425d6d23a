"""Re-launch a training command until it finishes: `python -m bdt.cluster.resume [opts] -- CMD`.

    python -m bdt.cluster.resume --max-restarts 3 -- \\
        torchrun --nproc-per-node 8 bdt/train.py --config X.yaml run_dir=/runs/a \\
        checkpoint.dir=s3://b/a/checkpoints

The trainer resumes by itself from the newest complete checkpoint under checkpoint.dir (local or
s3://); this wrapper supplies the restarts around it and says what happened:
  - the command crashed (a rank was killed, a node died, any non-zero exit): wait (exponential
    backoff) and launch it again. At most --max-restarts restarts in a row without progress; a
    complete checkpoint this wrapper never listed before resets the count (also one older than
    a damaged newest checkpoint the trainer passed over; a listing that briefly misses
    checkpoints does not make them new when they reappear), so a long run survives many crashes
    while a job that cannot get past one point still gives up;
  - the wrapper got SIGTERM / SIGUSR1 / SIGHUP / SIGINT (preemption, SLURM's time-limit
    warning, a closed terminal, Ctrl-C; one ignored at the start, as `nohup` does, stays
    ignored): SIGTERM goes to the training ranks, they finish the step, save and exit; the
    wrapper exits STOPPED so the scheduler requeues the job (cluster/slurm/train.sbatch does).
    Further signals change nothing (--grace bounds the save), except a second SIGINT: it kills
    the launch. The launch runs in a session of its own, which a terminal's signals never reach;
  - the trainer failed before its first step on an error that describes its configuration or
    inputs (a missing model, shards of another tokenizer, ...: both trainers leave it in
    <run_dir>/launch_error.json, since a launcher's exit code cannot say): exit CANNOT_START at
    once, printing it. Network, storage and timeout errors, the run lock of a job still
    stopping, and a remote data source that listed no shards are restarted as crashes are;
  - the master port is held by another process on this host (the launch's master): exit
    CANNOT_START before launching, naming the holder;
  - the run finished: exit DONE (at once, launching nothing, when it had already finished
    with the same config).
The launch gets SIGTERM when this wrapper dies (PR_SET_PDEATHSIG), which makes its ranks save and
stop, so that a requeued job never meets the old one's ranks.
The run dir and checkpoint dir come from the training command's own config (`bdt/train.py
--config ... key=value` or `tokenizers/train.py ...`, read with the trainer's loader), or from
--run-dir/--checkpoint-dir when the command hides them (e.g. inside `srun bash -c '...'`).
Events go to stderr and, for a local run dir, to <run_dir>/resume.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

from bdt import storage
from bdt.cluster.hosts import is_this_host, port_holder
from bdt.cluster.launch_checks import master_endpoint, retry_may_fix
from bdt.cluster.launch_processes import rank_processes, stop_ranks, term_when_parent_dies
from bdt.cluster.run_state import (TOKENIZER_SCRIPT, TRAIN_SCRIPT, RunPaths,
                                   complete_checkpoints, finished_step, newest_step,
                                   paths_from_command, read_summary)
from bdt.entry import STOP_SIGNALS, leave_dead_terminal, stops_on
from bdt.training.metrics import open_line_log
from bdt.training.run_dir import LAUNCH_ERROR, checkpoint_root

DONE, USAGE, GAVE_UP, CANNOT_START, STOPPED = 0, 2, 3, 4, 75  # 75 = EX_TEMPFAIL: "try again later"
PORT_WAIT_S = 30.0  # a held master port may be an earlier launch's process still exiting
MAX_LAUNCH_ERROR_BYTES = 1 << 20
# The stop for a launcher whose ranks run elsewhere: srun answers a SIGTERM of its own with SIGKILL
# to every task (srun(1), SIGNALS); USR1 it forwards as is, and launch.sh makes it a SIGTERM per rank.
GROUP_STOP = {"srun": signal.SIGUSR1}


class Resumer:
    def __init__(self, cmd: list[str], paths: RunPaths, max_restarts: int, backoff: float,
                 max_backoff: float, grace: float, endpoint: tuple[str, int] | None = None):
        self.cmd, self.paths, self.endpoint = cmd, paths, endpoint
        self.max_restarts, self.backoff, self.max_backoff, self.grace = (
            max_restarts, backoff, max_backoff, grace)
        self.child: subprocess.Popen | None = None
        self.ranks: list = []  # the launch's local ranks (psutil.Process) seen so far
        self.stop_signal: int | None = None
        self.stop_time = 0.0
        local = not storage.is_remote(paths.run_dir)
        self.events = os.path.join(paths.run_dir, "resume.jsonl") if local else None
        # tag -> marker time of every complete checkpoint listed so far: a listing that briefly
        # misses some cannot make them look new afterwards.
        self.seen: dict[str, object] = {}

    # ---- logging -----------------------------------------------------------------------------
    def log(self, event: str, message: str, **fields) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(f"[bdt.resume {stamp}] {message}", file=sys.stderr, flush=True)
        if self.events:
            try:  # a record of events: failing to write one must not end the supervision
                os.makedirs(os.path.dirname(self.events), exist_ok=True)
                with open_line_log(self.events) as f:  # one line per event
                    f.write(json.dumps({"time": time.time(), "event": event, **fields}) + "\n")
            except OSError as e:
                print(f"[bdt.resume {stamp}] warning: cannot append to {self.events}: {e}",
                      file=sys.stderr, flush=True)

    def checkpoints(self) -> dict[str, tuple[int, object]]:
        try:
            return complete_checkpoints(self.paths.checkpoint_dir)
        except Exception as exc:  # a flaky listing must not kill the supervisor of a long run
            root = self.paths.checkpoint_dir
            # A store's error names the root already (storage.naming_url); a bug's may not.
            where = "" if root.rstrip("/") in str(exc) else f" in {root}"
            self.log("warning", f"cannot list checkpoints{where}: {exc}")
            return {}

    def _any_new(self, listing: dict[str, tuple[int, object]]) -> bool:
        """Whether `listing` holds a complete checkpoint never listed before, or one written
        again (a new marker time: the trainer passed over a damaged one and redid it)."""
        new = False
        for tag, (_, written) in listing.items():
            known = self.seen.get(tag)
            new |= tag not in self.seen or (None not in (known, written) and known != written)
            self.seen[tag] = known if written is None else written
        return new

    def _launch_error(self) -> bytes | None:
        """Its first MAX_LAUNCH_ERROR_BYTES (a trainer writes a few KB: more is not its record,
        and must not exhaust the wrapper's memory)."""
        try:
            fs, path = storage.filesystem(storage.join(self.paths.run_dir, LAUNCH_ERROR))
            with fs.open(path, "rb") as f:
                return f.read(MAX_LAUNCH_ERROR_BYTES + 1)
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 (unreadable now: judged as a crash)
            self.log("warning", f"cannot read {LAUNCH_ERROR} in {self.paths.run_dir}: {exc}")
            return None

    def _new_launch_error(self, before: bytes | None) -> dict | None:
        """The error the last launch's trainer recorded before its first step; None if it
        recorded none (an older record, left by an earlier launch, is not this launch's)."""
        raw = self._launch_error()
        if raw is None or raw == before:
            return None
        try:
            record = json.loads(raw) if len(raw) <= MAX_LAUNCH_ERROR_BYTES else None
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past the parser
            record = None
        return record if isinstance(record, dict) else {"message": f"unreadable {LAUNCH_ERROR}"}

    def _held_master_port(self) -> str | None:
        """Who holds the master port, when this host is the master and it stays held for
        PORT_WAIT_S; else None."""
        if self.endpoint is None or not is_this_host(self.endpoint[0]):
            return None
        end = time.monotonic() + PORT_WAIT_S
        while (holder := port_holder(self.endpoint[1])) and time.monotonic() < end \
                and self.stop_signal is None:
            time.sleep(0.5)
        return holder

    # ---- signals -----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGHUP:  # the terminal is gone: its writes fail (EIO), print() with them
            leave_dead_terminal()
        if self.stop_signal is not None:
            # Only Ctrl-C twice means "now": a scheduler sends TERM to the wrapper and to the batch
            # shell (which forwards it) at once, and TERM after USR1 at the time limit.
            if signum == signal.SIGINT and self.child is not None:
                self._kill_launch()
            return
        self.stop_signal, self.stop_time = signum, time.monotonic()
        self._forward_stop()

    def _forward_stop(self) -> None:
        """SIGTERM to the local training ranks, so each saves and exits 0 and the launcher sees
        clean exits (signalling torchrun or the deepspeed launcher instead makes it kill the
        ranks after its own short timeout). Ranks that are not local (srun, pdsh) are reached
        by signalling the launcher's process group (with GROUP_STOP's signal for srun)."""
        if self.child is None or self.child.poll() is not None:
            return
        if not stop_ranks(self.child.pid, wait_s=0):
            launcher = os.path.basename(self.cmd[0])
            self._signal_group(GROUP_STOP.get(launcher, signal.SIGTERM))

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.child.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_launch(self) -> None:
        """SIGKILL the launch's process group and the ranks seen under it: torchrun starts each
        rank in a session of its own, out of the group's reach, and they outlive a killed torchrun."""
        import psutil

        self._signal_group(signal.SIGKILL)
        for proc in self.ranks:
            try:
                proc.kill()  # psutil checks the start time: a reused pid is not touched
            except psutil.Error:  # it already exited
                pass

    # ---- one launch ----------------------------------------------------------------------------
    def _launch(self) -> int:
        # Its own session: a terminal's Ctrl-C reaches only this wrapper, which decides.
        wrapper = os.getpid()
        self.child = subprocess.Popen(self.cmd, start_new_session=True,
                                      preexec_fn=lambda: term_when_parent_dies(wrapper))
        self.ranks = []
        if self.stop_signal is not None:  # it came while the launch was starting
            self._forward_stop()
        while True:
            try:
                rc = self.child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                self.ranks += [p for p in rank_processes(self.child.pid) if p not in self.ranks]
                if self.stop_signal is not None and time.monotonic() - self.stop_time > self.grace:
                    self.log("kill", f"ranks did not exit within --grace {self.grace:.0f}s of the "
                             f"stop signal: killing the launch")
                    self._kill_launch()
        self._kill_launch()  # leftovers of the launch (orphaned ranks)
        self.child = None
        return rc

    def _finished(self, rc: int, started: float, newest: int | None) -> tuple[bool, str]:
        """(done, why not), `newest` the step of the newest complete checkpoint now. Exit 0 is
        also what a rank stopped by a signal returns after saving: rank 0's summary.json says
        which (stopped: true/false)."""
        summary, missing = read_summary(self.paths.run_dir, written_after=started)
        stopped = None if summary is None else bool(summary.get("stopped"))
        if rc != 0:
            if stopped is False and newest is not None and summary.get("step") == newest:
                # environment.md: rarely a rank aborts in its exit after all is saved
                self.log("note", f"exit code {rc} after the launch's summary.json said it "
                         f"finished at step {newest}, whose checkpoint is complete: a process "
                         f"failed while exiting; taking it as finished")
                return True, ""
            return False, f"exit code {rc}"
        if stopped is None:
            if self.stop_signal is not None:  # after our stop, exit 0 is most likely a save
                self.log("note", f"exit 0 after the stop signal and {missing}: taking it as "
                         f"stopped, not finished")
                return False, "exit 0 after the stop signal"
            self.log("note", f"exit 0 and {missing}: taking exit 0 as finished")
            return True, ""
        return (False, "the ranks were stopped by a signal and saved") if stopped else (True, "")

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.stop_signal is None and time.monotonic() < end:
            time.sleep(min(0.5, end - time.monotonic()))

    def run(self) -> int:
        if os.getpid() == 1:
            self.log("warning", "running as PID 1 (a container's init): processes a launch "
                     "leaves behind are never reaped; run it under an init (`docker run "
                     "--init`, tini) or, on Kubernetes, with shareProcessNamespace: true")
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS
                    if stops_on(sig)}
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        finished = finished_step(self.paths, self.checkpoints())
        if finished is not None:  # a requeue or a resubmission of a run that ended
            self.log("done", f"the run already finished at step {finished} with this config "
                     f"({self.paths.run_dir}/summary.json): nothing to launch (change the config "
                     f"to train on; remove summary.json to redo its end and export)",
                     checkpoint_step=finished)
            return DONE
        failures, attempt = 0, 0
        while self.stop_signal is None:
            attempt += 1
            holder = self._held_master_port()
            if self.stop_signal is not None:
                break
            if holder is not None:
                address, port = self.endpoint
                self.log("cannot_start", f"attempt {attempt}: the master port {port} of {address} "
                         f"(this host) is held by {holder}: the rendezvous would fail; stop it "
                         f"or choose another port (--master-port / MASTER_PORT)", attempt=attempt)
                return CANNOT_START
            known = self.checkpoints()
            if self._any_new(known):  # written by the last launch, missed by the listing after it
                failures = 0
            before = newest_step(known)
            origin = (f"step {before} (or an older one if that fails verification)"
                      if before is not None else "scratch (no complete checkpoint)")
            self.log("launch", f"attempt {attempt}: launching; the trainer resumes from {origin} "
                     f"in {self.paths.checkpoint_dir}", attempt=attempt, checkpoint_step=before,
                     cmd=self.cmd)
            started, old_error = time.time(), self._launch_error()
            try:
                rc = self._launch()
            except OSError as e:  # not found, not executable: no restart can fix it
                self.log("cannot_start", f"attempt {attempt}: cannot run {self.cmd[0]!r}: {e}",
                         attempt=attempt)
                return CANNOT_START
            now = self.checkpoints()
            after = newest_step(now)
            done, why = self._finished(rc, started, after)
            fields = dict(attempt=attempt, exit_code=rc, checkpoint_step=after)
            if done:
                self.log("done", f"attempt {attempt}: training finished (newest checkpoint: step "
                         f"{after})", **fields)
                return DONE
            if self.stop_signal is not None:
                name = signal.Signals(self.stop_signal).name
                self.log("stopped", f"attempt {attempt}: stopped on {name} ({why}); newest "
                         f"complete checkpoint: step {after}; rerun (or requeue) to continue",
                         signal=name, **fields)
                return STOPPED
            error = self._new_launch_error(old_error)
            if error is not None:
                fields["error"] = error
                why += (f"; before its first step, rank {error.get('rank', '?')} on "
                        f"{error.get('host', '?')} failed: {error.get('message')}")
                if not retry_may_fix(error):
                    self.log("cannot_start", f"attempt {attempt} ended ({why}). A restart would "
                             f"meet the same error: not restarting", **fields)
                    return CANNOT_START
            progressed = self._any_new(now)
            failures = 1 if progressed else failures + 1
            if failures > self.max_restarts:
                self.log("gave_up", f"attempt {attempt} ended ({why}); {failures - 1} restarts "
                         f"in a row made no new checkpoint (newest: step {after}): giving up "
                         f"(--max-restarts {self.max_restarts})", **fields)
                return GAVE_UP
            # the exponent capped: a 'restart forever' --max-restarts overflowed the float
            delay = min(self.backoff * 2.0 ** min(failures - 1, 64), self.max_backoff)
            news = "new" if progressed else "no progress"
            self.log("restart", f"attempt {attempt} ended ({why}); newest complete checkpoint: "
                     f"step {after} ({news}); restart {failures}/{self.max_restarts} in "
                     f"{delay:.0f}s", delay_s=delay, **fields)
            self._sleep(delay)
            if self.stop_signal is not None:
                break
        self.log("stopped", "stop signal before a launch; nothing is running", attempt=attempt)
        return STOPPED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, cmd = _parser().parse_args(argv[:split]), argv[split + 1:]
    try:
        if not cmd:
            raise ValueError("no command: put it after `--`")
        seconds = (args.backoff, args.max_backoff, args.grace)
        if args.max_restarts < 0 or not all(0 <= s < math.inf for s in seconds):
            # NaN passed the old check: a restart at once ("in nans"), a --grace that never ends
            raise ValueError(f"--max-restarts must be >= 0, --backoff, --max-backoff and --grace "
                             f"finite numbers >= 0; got {args.max_restarts}, "
                             f"{', '.join(map(str, seconds))}")
        found = paths_from_command(cmd)  # also fails early on a bad training config
        endpoint = master_endpoint(cmd, os.environ)
        if args.run_dir:
            paths = RunPaths(args.run_dir, checkpoint_root(args.run_dir, args.checkpoint_dir or ""))
        elif found:
            paths = RunPaths(found.run_dir, args.checkpoint_dir or found.checkpoint_dir,
                             found.config)
        else:
            raise ValueError(f"the command runs no {TRAIN_SCRIPT} or {TOKENIZER_SCRIPT} this "
                             f"wrapper can read: pass "
                             f"--run-dir (and --checkpoint-dir unless it is <run_dir>/checkpoints)")
    except (ValueError, OSError) as exc:
        print(f"bdt.cluster.resume: error: {exc}", file=sys.stderr)
        return USAGE
    return Resumer(cmd, paths, args.max_restarts, args.backoff, args.max_backoff, args.grace,
                   endpoint).run()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bdt.cluster.resume", description=__doc__.split("\n")[0],
        epilog=f"exit codes: {DONE} done, {STOPPED} stopped by a signal (checkpoint saved; "
               f"requeue), {GAVE_UP} gave up, {CANNOT_START} cannot start (an error in the "
               f"configuration or inputs, or the master port taken), {USAGE} bad usage")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="restarts in a row without a new complete checkpoint (default 3)")
    p.add_argument("--backoff", type=float, default=30.0,
                   help="first wait before a restart, s, doubling with each failure (default 30)")
    p.add_argument("--max-backoff", type=float, default=600.0, help="longest wait, s (default 600)")
    p.add_argument("--grace", type=float, default=600.0,
                   help="after a stop signal, seconds the ranks get to save before a SIGKILL "
                        "(default 600)")
    p.add_argument("--run-dir", default="", help="the run's run_dir (default: from the command)")
    p.add_argument("--checkpoint-dir", default="",
                   help="the run's checkpoint.dir (default: from the command, or "
                        "<run_dir>/checkpoints)")
    return p


if __name__ == "__main__":
    sys.exit(main())
