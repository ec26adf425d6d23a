r"""Chaos test of the AR trainer's exact resume: SIGKILL (or SIGTERM) a real 2-rank launch at
random moments, relaunch until it finishes, and check it ends exactly as an uninterrupted run.

    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 .venv/bin/python scripts/chaos_resume.py \
        [--kills 8] [--seed 0] [--launcher deepspeed|torchrun] [--steps 12 12] [--every 2] \
        [--signal kill|term] [--deliver group|launcher] [--term-bound 90] \
        [--zero 2] [--workdir DIR] [--keep] [key=value ...]

What it does, in --workdir (a temporary directory by default, removed unless --keep or a
mismatch):
  1. builds a tiny run: a tiny Qwen3 with its tokenizer and random 16-bit token shards, with the
     test suite's builders (tests/trainutil.py), and the tiny config (configs/train/tiny.yaml)
     with one stage per --steps entry and a checkpoint every --every steps;
  2. trains it once uninterrupted under the launcher (`deepspeed --num_gpus 2` or
     `torchrun --nproc_per_node 2`, CPU ranks, one thread each): the reference;
  3. trains the same config in a second run directory, SIGKILLing the launch's process group
     and every process under it (torchrun's ranks have sessions of their own) --kills times
     (seeded) and relaunching after each kill. Each kill is aimed at one of:
       start   a random moment of the start-up (imports, engine build, resume)
       locked  a random moment of the start-up once the run lock is taken (a stop there
               writes a summary)
       step    a random moment once the launch is training
       save    while a checkpoint is being written (a step_* directory without COMPLETE)
       marker  as soon as a new COMPLETE marker appears (pruning and the save's last barrier)
     then runs it to the end;
  4. compares: every step's metrics record (loss, text_ce, vision, bit_accuracy, grad_norm,
     lr, samples read) bitwise, each step logged once, the exported weights tensor by tensor,
     the ranks' final parameter digests; and checks that no launch crashed, that no kill left
     a checkpoint marked complete with files missing, and that every resume took the newest
     complete checkpoint on disk, passing over none (a SIGKILL damages none that is complete).
With --signal term (preemption) each signal is a SIGTERM, to every process of the launch at once
(--deliver group, as SLURM signals a step) or to the launcher alone (--deliver launcher, as
Kubernetes signals a container's first process), and a target `twice` sends a second one
0.2-3 s after the first. The launch must then end by itself within --term-bound seconds (else it
is SIGKILLed and reported), without a traceback, its summary.json (if it wrote one) naming the
newest complete checkpoint as the step it saved; the next launch resumes from there.
Prints one row per signal (when, which target, what was on disk, and for SIGTERM how the launch
ended) and the verdict; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # the test suite's tiny-run builders
sys.path.insert(0, REPO)

from chaos_launch import Launch, summary_of, terminate, written_since  # noqa: E402 (beside this script)

TARGETS = ("start", "locked", "step", "save", "marker")
LOCKED_S = 2.0  # `locked` lands within this of the run lock's creation (the rest of start-up)
TWICE = "twice"  # --signal term: a second SIGTERM shortly after the first (an impatient scheduler)
COMPARED = ("loss", "text_ce", "vision", "bit_accuracy", "grad_norm", "lr", "data/samples_read")
POLL_S = 0.002


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", "--signals", dest="kills", type=int, default=8,
                   help="signals before the run may finish")
    p.add_argument("--signal", choices=("kill", "term"), default="kill")
    p.add_argument("--deliver", choices=("group", "launcher"), default="group",
                   help="term: to every process of the launch at once (as SLURM signals a "
                        "step), or to the launcher alone (as Kubernetes signals a container)")
    p.add_argument("--term-bound", type=float, default=90.0,
                   help="seconds a SIGTERMed launch may take to end by itself")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill plan")
    p.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")
    p.add_argument("--steps", type=int, nargs="+", default=[12, 12], help="steps per stage")
    p.add_argument("--every", type=int, default=2, help="checkpoint.every")
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--targets", nargs="+", choices=(*TARGETS, TWICE),
                   help="what signals aim at (drawn uniformly; default: all, twice with term)")
    p.add_argument("--workdir", default="", help="default: a new temporary directory")
    p.add_argument("--keep", action="store_true", help="keep --workdir even when all matches")
    p.add_argument("--launch-timeout", type=float, default=600.0, help="seconds per launch")
    p.add_argument("overrides", nargs="*", help="more key=value overrides for both runs "
                                                "(e.g. ema_decay=0.99)")
    args = p.parse_args(argv)
    args.targets = args.targets or [*TARGETS, *([TWICE] if args.signal == "term" else [])]
    if TWICE in args.targets and args.signal != "term":
        p.error("--targets twice needs --signal term")
    return args


def build(work: str, args) -> dict:
    """The tiny model and shards (one shard family per stage)."""
    from trainutil import tiny_llm, write_shards

    llm = tiny_llm(os.path.join(work, "llm"))
    shards = []
    for i, _ in enumerate(args.steps):
        grids = [(4, 4), (4, 8), (8, 4)] if i % 2 == 0 else [(8, 8), (4, 8)]
        urls = write_shards(os.path.join(work, f"s{i}"), grids, num_shards=2, per_shard=10,
                            seed=i, factor=2)
        shards.append(os.path.dirname(urls[0]))
    return {"llm": llm, "shards": shards}


def command(args, data: dict, run_dir: str) -> list[str]:
    from testkit import TINY_CONFIG
    from trainutil import train_overrides

    from bdt.training.distributed import free_port

    bindir = os.path.dirname(sys.executable)
    port = str(free_port())
    launch = ([os.path.join(bindir, "deepspeed"), "--num_gpus", "2", "--master_port", port]
              if args.launcher == "deepspeed" else
              [os.path.join(bindir, "torchrun"), "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", port])
    return [*launch, os.path.join(REPO, "bdt", "train.py"), "--config", TINY_CONFIG,
            *train_overrides(run_dir, data["llm"], data["shards"], steps=args.steps,
                             zero=args.zero, every=args.every,
                             extra=["threads=1", *args.overrides])]


def env() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def on_disk(run_dir: str) -> dict:
    """The checkpoints (step -> complete?), the last step with a loss in metrics.jsonl, and
    whether an export (or half of one) is there."""
    from bdt.training.checkpoint import list_checkpoints

    root = os.path.join(run_dir, "checkpoints")
    ckpts = {step: done for step, _, done in list_checkpoints(root)}
    damaged = [step for step, tag, done in list_checkpoints(root)
               if done and missing_files(os.path.join(root, tag))]
    losses = [rec["step"] for rec in records_since(run_dir, 0) if "loss" in rec]
    export = [name for name in ("export", "export.tmp")
              if os.path.isdir(os.path.join(run_dir, name))]
    return {"ckpts": ckpts, "damaged": damaged, "last_step": max(losses, default=0),
            "export": export}


def missing_files(ckpt_dir: str) -> list[str]:
    """Files the marker of a complete checkpoint lists that are absent or of another size."""
    from bdt.training.integrity import MARKER

    try:
        with open(os.path.join(ckpt_dir, MARKER)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return [MARKER]  # read while a save or prune changed it: judged by its next look
    return [rel for rel, entry in files.items()
            if not os.path.isfile(path := os.path.join(ckpt_dir, rel))
            or os.path.getsize(path) != entry["bytes"]]


def describe(state: dict) -> str:
    ckpts = " ".join(f"{step}{'' if done else '(partial)'}"
                     f"{'(DAMAGED)' if step in state['damaged'] else ''}"
                     for step, done in sorted(state["ckpts"].items()))
    return f"metrics@{state['last_step']} ckpts[{ckpts or '-'}] {' '.join(state['export'])}"


def aim(launch: Launch, target: str, run_dir: str, rng: random.Random, start_s: float,
        step_s: float, total: int, every: int, since: float, newest: int | None, timeout: float
        ) -> str | None:
    """Wait until `target` is reached (then kill), or the launch ends; returns what was hit,
    or None when the launch ended first."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    delay = rng.uniform(0, start_s) if target == "start" else None
    trained_at = None
    while launch.proc.poll() is None and launch.elapsed() < timeout:
        if target == "start" and launch.elapsed() >= delay:
            return "start"
        if target == "locked" and delay is None and written_since(
                os.path.join(run_dir, "RUN_LOCK"), launch.wall0):
            delay = launch.elapsed() + rng.uniform(0, LOCKED_S)
        if target == "locked" and delay is not None and launch.elapsed() >= delay:
            return "locked"
        if target == "step":
            if trained_at is None and steps_logged_since(run_dir, since):
                # within the next two checkpoint intervals (at the reference's pace), so that
                # the kill lands before the run ends and the next resume is not always the last
                left = min(total - (newest or 0), 2 * every)
                trained_at, delay = launch.elapsed(), rng.uniform(0, left * step_s)
            if trained_at is not None and launch.elapsed() - trained_at >= delay:
                return "step"
        if target in ("save", "marker") and os.path.isdir(ckpt_root):
            # a checkpoint after the one resumed from, written since the launch started,
            # without / with its marker (older ones change only when pruned)
            for name in os.listdir(ckpt_root):
                path = os.path.join(ckpt_root, name)
                fresh = (name.startswith("step_") and name[5:].isdigit()
                         and int(name[5:]) > (newest or 0)
                         and written_since(path, launch.wall0))  # False once pruned meanwhile
                done = os.path.exists(os.path.join(path, "COMPLETE"))
                if fresh and target == "save" and not done:
                    time.sleep(rng.uniform(0, POLL_S))  # a tiny run's save takes milliseconds
                    return "save"
                if fresh and target == "marker" and done:
                    return "marker"
        time.sleep(POLL_S)
    return None


def records_since(run_dir: str, since: float) -> list[dict]:
    """The whole metrics records logged at wall-clock time `since` or later (by their `time`:
    a resume cuts the file back, so a byte offset would not mark where a launch began)."""
    out = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # the record a kill cut short
            if rec.get("time", 0) >= since:
                out.append(rec)
    return out


def steps_logged_since(run_dir: str, since: float) -> bool:
    return any("loss" in rec for rec in records_since(run_dir, since))


def resumes_since(run_dir: str, since: float) -> list[tuple[int, int]]:
    """(resumed_from_step, checkpoints_skipped) of every resume logged since `since`."""
    return [(rec["resumed_from_step"], rec["checkpoints_skipped"])
            for rec in records_since(run_dir, since) if "resumed_from_step" in rec]


def newest_complete(run_dir: str) -> int | None:
    done = [s for s, complete in on_disk(run_dir)["ckpts"].items() if complete]
    return max(done) if done else None


def check_resume(run_dir: str, since: float, newest: int | None, launch: int, resumes: list,
                 problems: list) -> None:
    """The launch resumed (if it got that far) from the newest complete checkpoint on disk
    when it started, passing over none (a SIGKILL damages no complete checkpoint)."""
    for frm, skipped in resumes_since(run_dir, since):
        resumes.append(int(frm))
        if skipped or frm != newest:
            problems.append(f"launch {launch} resumed from step {frm} passing over {skipped} "
                            f"checkpoint(s); the newest complete one on disk was {newest}")


def compare(ref_dir: str, run_dir: str, total: int) -> list[str]:
    import torch

    from trainutil import export_tensors, read_metrics

    problems = []
    ref, got = read_metrics(ref_dir), read_metrics(run_dir)
    for step in range(1, total + 1):
        if step not in got:
            problems.append(f"step {step}: no metrics record")
            continue
        for key in COMPARED:
            a, b = ref[step].get(key), got[step].get(key)
            if a != b:
                problems.append(f"step {step} {key}: reference {a!r}, chaos run {b!r}")
    logged = [rec["step"] for rec in records_since(run_dir, 0) if "loss" in rec]
    repeated = sorted({step for step in logged if logged.count(step) > 1})
    if repeated:  # a resume cuts what the killed launch logged past its checkpoint
        problems.append(f"metrics.jsonl logs step(s) {repeated} more than once")
    ref_w, got_w = export_tensors(ref_dir), export_tensors(run_dir)
    if ref_w.keys() != got_w.keys():
        problems.append(f"exported tensors differ in names: {sorted(ref_w.keys() ^ got_w.keys())}")
    for k in sorted(ref_w.keys() & got_w.keys()):
        if not torch.equal(ref_w[k], got_w[k]):
            problems.append(f"exported tensor {k} differs")
    digests = [json.load(open(os.path.join(d, "summary.json"))).get("param_digests")
               for d in (ref_dir, run_dir)]
    if digests[0] != digests[1]:
        problems.append(f"final parameter digests differ: {digests[0]} vs {digests[1]}")
    return problems


def chaos_run(args, data: dict, work: str, run_dir: str, rng: random.Random, start_s: float,
              step_s: float) -> tuple[list, list[str], list[int]]:
    """Launch, signal, relaunch until the run finishes (or a launch fails on its own); returns
    the signal table's rows, the problems seen and the steps the launches resumed from."""
    rows, problems, resumes, launches = [], [], [], 0
    while True:
        launches += 1
        newest = newest_complete(run_dir)
        launch = Launch(command(args, data, run_dir),
                        os.path.join(work, f"chaos_{launches:03d}.log"), env())
        hit = target = None
        if len(rows) < args.kills:
            target = rng.choice(args.targets)
            hit = aim(launch, rng.choice(TARGETS) if target == TWICE else target, run_dir, rng,
                      start_s, step_s, sum(args.steps), args.every, launch.wall0, newest,
                      args.launch_timeout)
        if hit is not None:
            at = launch.elapsed()
            outcome = ""
            if args.signal == "term":
                outcome = terminate(launch, args.deliver == "group", args.term_bound,
                                    rng.uniform(0.2, 3.0) if target == TWICE else None, run_dir,
                                    lambda: newest_complete(run_dir), problems)
            else:
                launch.kill()
            state = on_disk(run_dir)
            rows.append((len(rows) + 1, f"{at:.2f}", hit + ("+again" if target == TWICE else ""),
                         describe(state), outcome))
            if state["damaged"]:
                problems.append(f"signal {len(rows)} left checkpoint(s) {state['damaged']} "
                                f"marked complete with files missing")
        else:
            rc = launch.wait(args.launch_timeout)
        check_resume(run_dir, launch.wall0, newest, launches, resumes, problems)
        if hit is not None:
            continue
        if rc != 0:  # a crash on resume: relaunching would most likely repeat it
            problems.append(f"launch {launches} ended with exit {rc} without being signalled "
                            f"(log {launch.log_path}):\n{launch.log_tail()}")
        elif summary_of(run_dir).get("stopped", True):
            problems.append(f"launch {launches} exited 0 without a summary of a finished run")
        return rows, problems, resumes


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="bdt-chaos-")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(args.seed)
    total = sum(args.steps)
    data = build(work, args)

    ref_dir = os.path.join(work, "ref")
    ref = Launch(command(args, data, ref_dir), os.path.join(work, "ref.log"), env())
    rc = ref.wait(args.launch_timeout)
    ref_s = ref.elapsed()
    if rc != 0:
        print(f"reference run failed (exit {rc}):\n{ref.log_tail()}")
        return 2
    records = records_since(ref_dir, 0)
    start_s = max(1.0, records[0]["time"] - ref.wall0)
    steps = [rec["time"] for rec in records if "loss" in rec]
    step_s = statistics.median(b - a for a, b in zip(steps, steps[1:]))  # saves included
    print(f"reference: {total} steps in {ref_s:.1f} s (start-up {start_s:.1f} s, "
          f"{step_s:.2f} s a step)")

    run_dir = os.path.join(work, "chaos")
    rows, problems, resumes = chaos_run(args, data, work, run_dir, rng, start_s, step_s)
    print(f"\n{'sig':>4}  {'at s':>7}  {'target':<12} on disk after it ({args.signal}"
          f"{'' if args.signal == 'kill' else ' to the ' + args.deliver}: signal n ends launch "
          f"n, at s seconds into it)")
    for row in rows:
        print(f"{row[0]:>4}  {row[1]:>7}  {row[2]:<12} {row[3]}{'  | ' + row[4] if row[4] else ''}")
    print(f"launches: {len(rows) + 1}, resumed from steps: {resumes}")
    if summary_of(run_dir).get("stopped") is False:
        problems += compare(ref_dir, run_dir, total)
    elif not problems:
        problems.append("the chaos run never finished")
    if problems:
        print(f"\nMISMATCH ({len(problems)}), workdir kept: {work}")
        for p in problems:
            print(" -", p)
        return 1
    early = "" if len(rows) == args.kills else f" (of {args.kills}: the run finished first)"
    print(f"\nOK: {len(rows)} signals{early}; losses, exported weights and final parameter "
          f"digests equal the reference")
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
