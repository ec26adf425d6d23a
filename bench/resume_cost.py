"""Resume cost (issue 8 item 8): time from restart to the first training step, samples re-read.

    .venv/bin/python bench/resume_cost.py [--steps 6]

Three launches of `python bdt/train.py --config configs/train/tiny.yaml` (one process, the tiny
config, random 16-bit token shards), one after another:
  fresh        the whole run (`--steps` steps, a checkpoint at the midpoint) uninterrupted
  killed       the same run SIGKILLed right after the midpoint checkpoint (fault injection)
  resumed      the same command again: it resumes from that checkpoint and finishes
Restart-to-first-step = the first step's metrics record time - the launch time, for `fresh`
(a cold start) and `resumed` (the same start plus finding and loading the checkpoint).
Samples re-read = the resumed run's samples_read counter at the last step (restored from the
checkpoint, then counting on) - the fresh run's at the same step; the losses must match too.
Writes bench/results/resume_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import CAPTIONS, REPO, Run, bench_env, goal, table, write_token_shard

GRIDS = [(8, 8), (6, 10), (10, 6)]


def make_shards(out: str, n: int = 200, per_shard: int = 50) -> None:
    rng = np.random.default_rng(0)
    for k in range(n // per_shard):
        grids = [GRIDS[j % len(GRIDS)] for j in range(k * per_shard, (k + 1) * per_shard)]
        write_token_shard(os.path.join(out, f"{k:06d}.tar"),
                          ((rng.integers(0, 256, (h, w, 2), dtype=np.uint8), (w * 16, h * 16),
                            CAPTIONS[j % len(CAPTIONS)]) for j, (h, w) in enumerate(grids)))


def launch(run_dir: str, llm: str, shards: str, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "bdt", "train.py"), "--config",
           os.path.join(REPO, "configs", "train", "tiny.yaml"), f"run_dir={run_dir}",
           f"model.backbone.path={llm}", f"data.root={shards}", f"checkpoint.every={steps // 2}",
           "export=false", "threads=1",
           f"stages=[{{name: '128', shards: '{shards}', steps: {steps}, token_budget: 256, "
           f"lr: 3e-3, warmup_steps: 2}}]", *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, env=bench_env(), capture_output=True, text=True)
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps_done = [r for r in recs if "loss" in r and r["time"] >= t0]
    if not steps_done:
        raise RuntimeError(f"{run_dir}: no training step logged (exit {proc.returncode}):\n"
                           f"{proc.stderr[-2000:]}")
    return {"launch": t0, "first_step_s": steps_done[0]["time"] - t0, "records": steps_done,
            "returncode": proc.returncode}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="a checkpoint at the midpoint")
    args = ap.parse_args()
    if args.steps < 2:  # the midpoint checkpoint needs a step before it
        ap.error(f"--steps must be >= 2, got {args.steps}")
    from bdt.model.backbone import make_tiny_llm

    half = args.steps // 2
    with Run("resume_cost") as run, tempfile.TemporaryDirectory() as tmp:
        llm = make_tiny_llm(os.path.join(tmp, "llm"), CAPTIONS * 20)
        shards = os.path.join(tmp, "shards")
        make_shards(shards)
        fresh = launch(os.path.join(tmp, "fresh"), llm, shards, args.steps, [])
        broken = os.path.join(tmp, "broken")
        killed = launch(broken, llm, shards, args.steps, [f"fault.kill_after_checkpoint={half}"])
        resumed = launch(broken, llm, shards, args.steps, [])
        last_fresh, last_resumed = fresh["records"][-1], resumed["records"][-1]
        reread = int(last_resumed["data/samples_read"] - last_fresh["data/samples_read"])
        same_losses = ([r["loss"] for r in fresh["records"][half:]]
                       == [r["loss"] for r in resumed["records"]])
        extra_s = resumed["first_step_s"] - fresh["first_step_s"]
        table(["launch", "to first step s", "first step", "samples_read at end", "exit"],
              [["fresh", fresh["first_step_s"], fresh["records"][0]["step"],
                last_fresh["data/samples_read"], fresh["returncode"]],
               ["killed", killed["first_step_s"], killed["records"][0]["step"], "-",
                killed["returncode"]],
               ["resumed", resumed["first_step_s"], resumed["records"][0]["step"],
                last_resumed["data/samples_read"], resumed["returncode"]]],
              f"resume of the tiny config, checkpoint at step {half} of {args.steps}")
        print(f"samples re-read: {reread}; losses after resume equal the uninterrupted run's: "
              f"{same_losses}")
        goals = [goal("8. resume: restart to first step, samples re-read",
                      f"{resumed['first_step_s']:.1f} s ({extra_s:+.1f} s vs a cold start), "
                      f"{reread} re-read", "0 re-read", reread == 0 and same_losses,
                      "start-up (imports, DeepSpeed init) dominates; loading adds the rest")]
        run.write({"steps": args.steps, "checkpoint_step": half,
                   "first_step_s": {"fresh": fresh["first_step_s"],
                                    "killed": killed["first_step_s"],
                                    "resumed": resumed["first_step_s"]},
                   "resume_extra_s": extra_s, "samples_reread": reread,
                   "losses_equal": same_losses, "killed_returncode": killed["returncode"]}, goals)


if __name__ == "__main__":
    main()
