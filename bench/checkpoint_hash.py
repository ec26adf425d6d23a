"""Checkpoint integrity cost (issue 18): which hash, and what hashing adds to a save and a resume.

    .venv/bin/python bench/checkpoint_hash.py [--width 2048] [--layers 6] [--repeats 3]

One process (a world of one, DeepSpeed ZeRO-2 on CPU) builds an MLP of `layers` square linear
layers (2048 x 6: 25M parameters, a ~400 MB checkpoint: fp32 weights + master copy + Adam
moments) and measures, interleaved `repeats` times:
  ds_save        engine.save_checkpoint alone (what a save cost before the marker listed hashes)
  bdt_save       CheckpointManager.save: the same files + per-file size and sha256 in the marker
  sha256/blake2b hashlib over every file of the checkpoint (the page cache holds them: this is the
                 CPU cost a save adds, and a verification's when the files are cached)
  verify+load    CheckpointManager.resume (verification, weights-only load) vs DeepSpeed's
                 load_checkpoint alone
Writes bench/results/checkpoint_hash.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time

from common import Run, goal, table


def hash_files(paths: list[str], name: str) -> float:
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            hashlib.file_digest(f, name)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from bdt.training.checkpoint import CheckpointManager
    from bdt.training.deepspeed_config import (DeepSpeedConfig, OptimConfig, build_ds_config,
                                              initialize_engine, make_schedule)
    from bdt.training.distributed import init_distributed

    dist = init_distributed()
    optim = OptimConfig(lr=1e-3, warmup_steps=1)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width)
                                  for _ in range(args.layers)])
    engine = initialize_engine(model, build_ds_config(DeepSpeedConfig(zero_stage=2), optim, 1),
                               make_schedule(optim, total_steps=10))
    x = torch.randn(4, args.width)
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    times: dict[str, list[float]] = {k: [] for k in ("ds_save", "bdt_save", "sha256", "blake2b",
                                                       "ds_load", "bdt_resume")}
    with Run("checkpoint_hash") as run, tempfile.TemporaryDirectory() as tmp:
        mgr = CheckpointManager(os.path.join(tmp, "bdt"), dist, keep_last=1)
        for i in range(args.repeats):
            t0 = time.perf_counter()
            engine.save_checkpoint(os.path.join(tmp, "ds"), tag=f"t{i}", save_latest=False)
            times["ds_save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            tag = mgr.save(i + 1, {"model": engine}, {"step": i + 1})
            times["bdt_save"].append(time.perf_counter() - t0)
            files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(mgr.root, tag))
                     for f in fs if f != "COMPLETE"]
            for name in ("sha256", "blake2b"):
                times[name].append(hash_files(files, name))
            t0 = time.perf_counter()
            engine.load_checkpoint(os.path.join(tmp, "ds"), tag=f"t{i}")
            times["ds_load"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            mgr.resume({"model": engine})
            times["bdt_resume"].append(time.perf_counter() - t0)
        size_mb = sum(os.path.getsize(f) for f in files) / 1e6
    med = {k: statistics.median(v) for k, v in times.items()}
    table(["measure", "median s", "MB/s", "vs DeepSpeed alone"],
          [["ds_save", med["ds_save"], size_mb / med["ds_save"], 1.0],
           ["bdt_save (+ sha256 in marker)", med["bdt_save"], size_mb / med["bdt_save"],
            med["bdt_save"] / med["ds_save"]],
           ["sha256 of the files", med["sha256"], size_mb / med["sha256"], "-"],
           ["blake2b of the files", med["blake2b"], size_mb / med["blake2b"], "-"],
           ["ds_load", med["ds_load"], size_mb / med["ds_load"], 1.0],
           ["bdt_resume (verify + load)", med["bdt_resume"], size_mb / med["bdt_resume"],
            med["bdt_resume"] / med["ds_load"]]],
          f"checkpoint of {size_mb:.0f} MB ({len(files)} files), {args.repeats} repeats, medians")
    faster = "sha256" if med["sha256"] <= med["blake2b"] else "blake2b"
    run.write({"size_mb": size_mb, "files": len(files), "times_s": times, "median_s": med,
               "sha_ni": "sha_ni" in open("/proc/cpuinfo").read()},
              [goal("checkpoint hash: the faster strong hash on this CPU",
                    f"sha256 {size_mb / med['sha256']:.0f} MB/s, blake2b "
                    f"{size_mb / med['blake2b']:.0f} MB/s", "sha256 (bdt's choice)",
                    faster == "sha256"),
               goal("checkpoint save with per-file sha256 vs DeepSpeed's save alone",
                    f"{med['bdt_save'] / med['ds_save']:.2f}x ({size_mb:.0f} MB)", "", None,
                    "hashing re-reads the files the writer just wrote (page cache)")])


if __name__ == "__main__":
    main()
