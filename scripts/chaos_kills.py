"""The kill-and-compare harness of scripts/chaos_extract.py: start a job in its own session, SIGKILL
it (the whole session, or the driver alone) at a moment or an event, rerun it until a try ends
by itself, and compare the output with an uninterrupted reference run."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
           RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
for _name in ("RAY_ADDRESS", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
    ENV.pop(_name, None)  # a private Ray and a plain single process, whatever the shell holds


# ---- one try: start, maybe kill ----------------------------------------------------------------

def _session_members(sid: int) -> list[psutil.Process]:
    """Every live process of session `sid` (the driver's own session: only what it started)."""
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                out.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def _kill_all(sid: int, known: dict[int, psutil.Process]) -> None:
    """SIGKILL the driver's session and every descendant seen (torchrun's ranks and bdt's Ray
    reaper run in sessions of their own): all at once, as a lost node dies."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)  # the driver's group first: it can start nothing more
    for proc in [*known.values(), *_session_members(sid)]:
        with contextlib.suppress(psutil.Error):
            proc.kill()  # psutil checks the start time: a reused pid is not touched


def run_once(cmd: list[str], log_path: str, kill_at: float | None, kill_when=None,
             whole_session: bool = True, orphan_wait_s: float = 30.0) -> dict:
    """Run `cmd` in a new session; SIGKILL it at `kill_at` seconds or as soon as
    `kill_when(start)` is true (`start`: the try's time.time()). Returns {"rc", "seconds",
    "killed", "orphans"}."""
    t0, start = time.monotonic(), time.time()
    with open(log_path, "ab") as log:
        log.write(f"\n=== {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    sid, known, killed = proc.pid, {}, False
    try:
        while proc.poll() is None:
            # Descendants that leave the session (bdt's Ray reaper does) are remembered too.
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    known.setdefault(child.pid, child)
            elapsed = time.monotonic() - t0
            if (kill_at is not None and elapsed >= kill_at) or (kill_when is not None and kill_when(start)):
                if whole_session:
                    _kill_all(sid, known)
                else:
                    proc.kill()
                killed = True
                break
            time.sleep(0.02)
    except BaseException:  # this script stopped (Ctrl-C, SIGTERM): its try goes with it
        _kill_all(sid, known)
        raise
    rc = proc.wait()
    seconds = time.monotonic() - t0
    return {"rc": rc, "seconds": seconds, "killed": killed, "orphans": _wait_gone(sid, known, orphan_wait_s)}


def _wait_gone(sid: int, known: dict[int, psutil.Process], timeout_s: float) -> list[str]:
    """Wait until nothing this try started runs; kill what is left after `timeout_s`, naming it."""
    deadline, left = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        left = [p for p in known.values() if p.is_running()] + _session_members(sid)
        if not left:
            return []
        time.sleep(0.2)
    names = []
    for p in left:
        with contextlib.suppress(psutil.Error):
            names.append(f"{p.pid}:{' '.join(p.cmdline())[:60]}")
            p.kill()
    return names


def chaos(ns: argparse.Namespace, command, compare, state, event) -> int:
    """The reference run, then rounds of killed tries (see the module docstring); returns the
    exit code. `command(out)`: the job writing `out`; `compare(ref, out)`: differences;
    `state(out)`: what `out` holds (for the table); `event(out, ref, rng, moment)`: (label,
    kill_when(start)) for a kill at an event of the job rather than at `moment`."""
    log = os.path.join(ns.work, "log.txt")
    ref = os.path.join(ns.work, "reference")
    shutil.rmtree(ref, ignore_errors=True)
    print(f"reference run -> {ref} (log {log})", flush=True)
    first = run_once(command(ref), log, None)
    if first["rc"] != 0:
        raise SystemExit(f"the reference run failed (exit {first['rc']}): see {log}")
    span = first["seconds"]
    print(f"  {span:.1f}s; kill moments drawn in [0.2, {span:.1f}]s", flush=True)
    rng, rows, diffs, kills, round_ = random.Random(ns.seed), [], [], 0, 0
    while kills < ns.kills:
        out = os.path.join(ns.work, f"killed-{round_}")
        shutil.rmtree(out, ignore_errors=True)
        while True:
            kill_at, trigger = rng.uniform(0.2, span), None
            label = f"{kill_at:.1f}s"
            if rng.random() < 0.5:
                label, trigger = event(out, ref, rng, kill_at)
                kill_at = span * 2  # a late fallback when the event never comes
            result = run_once(command(out), log, kill_at, trigger, ns.kill == "session", ns.orphan_wait_s)
            result.update(round=round_, planned=label, state=state(out))
            rows.append(result)
            kills += result["killed"]
            end = "KILLED" if result["killed"] else f"exit {result['rc']}"
            print(f"  round {round_} try {len(rows) - 1:2d}: kill {result['planned']:>8}  ran "
                  f"{result['seconds']:5.1f}s  {end:>7}  {result['state']}"
                  + ("  ORPHANS " + ", ".join(result["orphans"]) if result["orphans"] else ""), flush=True)
            if not result["killed"]:
                break
        if result["rc"] == 0:
            found = compare(ref, out)
            print(f"  round {round_}: {'matches the reference' if not found else f'{len(found)} differences'}")
            diffs += [f"round {round_}: {d}" for d in found]
        else:
            diffs.append(f"round {round_}: the run failed by itself (exit {result['rc']}), see {log}")
        round_ += 1
    return report(rows, diffs)


def report(rows: list[dict], diffs: list[str]) -> int:
    orphans = [o for r in rows for o in r["orphans"]]
    print(f"\n{'round':>5} {'try':>4} {'kill at':>9} {'ran s':>6} {'result':>7}  output when it ended")
    for i, r in enumerate(rows):
        print(f"{r['round']:>5} {i:>4} {r['planned']:>9} {r['seconds']:>6.1f} "
              f"{'KILLED' if r['killed'] else r['rc']:>7}  {r['state']}")
    for d in diffs:
        print(f"DIFF {d}")
    for o in orphans:
        print(f"ORPHAN (outlived its try, killed by this script) {o}")
    ok = not diffs and not orphans
    print(f"\n{sum(r['killed'] for r in rows)} kills, {len(rows)} starts, "
          f"{1 + max(r['round'] for r in rows)} rounds: {'MATCH' if ok else 'MISMATCH'}")
    return 0 if ok else 1


# ---- comparing outputs -----------------------------------------------------------------------

def file_digests(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def diff_json(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'the reference' if k in a else 'the killed run'}")
            else:
                out += diff_json(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff_json(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {json.dumps(a)[:80]} != {json.dumps(b)[:80]}"]


def compare_dirs(ref: str, got: str, special: dict) -> list[str]:
    """Differences between two output folders: `special[rel](ref_path, got_path)` compares the
    files that legitimately name their run (paths, timings); every other file byte for byte."""
    a, b = file_digests(ref), file_digests(got)
    out = [f"{rel}: only in the reference" for rel in sorted(set(a) - set(b))]
    out += [f"{rel}: only in the killed run's output (left over?)" for rel in sorted(set(b) - set(a))]
    for rel in sorted(set(a) & set(b)):
        if rel in special:
            out += [f"{rel}{d}" for d in special[rel](os.path.join(ref, rel), os.path.join(got, rel))]
        elif a[rel] != b[rel]:
            out.append(f"{rel}: bytes differ")
    return out
