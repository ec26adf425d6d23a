"""AR training throughput, MFU and packing on this machine: `python bdt/train.py`, one process.

    .venv/bin/python bench/train_throughput.py [--steps 12] [--budget 2048]

Model: a small Qwen3 (hidden 256, 4 layers) from make_tiny_llm + a 256-wide diffusion head,
P = 4, 16-bit tokens. Data: random token shards at the 256 px buckets of a 16x tokenizer
(16x16, 12x20, 20x12, 14x18, 18x14 tokens), captions of the shapes style. Each configuration
runs as its own process; the first 2 logged steps are warm-up and dropped, the rest averaged.
MFU: model FLOPs (bdt.trainer.flops) against the 1024x1024 matmul peak this script measures once
per dtype with the runs' thread count (passed to every run, so all rows share one denominator).
Other processes on the machine change every figure: compare rows of one invocation only.
Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np
import torch
import webdataset as wds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bdt.data.token_shards import TokenSample, encode_sample  # noqa: E402
from bdt.model.backbone import make_tiny_llm  # noqa: E402
from bdt.trainer.flops import measure_peak_flops  # noqa: E402

GRIDS = [(16, 16), (12, 20), (20, 12), (14, 18), (18, 14)]
CAPTIONS = ["a red circle", "two blue squares", "a green star left of a yellow cross",
            "three purple triangles", "a pink square above an orange circle"]
CONFIGS = [("zero0", "fp32"), ("zero2", "fp32"), ("zero2", "bf16")]


def make_shards(out: str, n: int = 400, per_shard: int = 100) -> None:
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n // per_shard):
        with wds.TarWriter(os.path.join(out, f"{k:06d}.tar"), encoder=False) as sink:
            for i in range(per_shard):
                j = k * per_shard + i
                h, w = GRIDS[j % len(GRIDS)]
                sink.write(encode_sample(TokenSample(
                    key=f"s{j:06d}", bits_hwB=rng.integers(0, 256, (h, w, 2), dtype=np.uint8),
                    bits_per_token=16, bucket=(w * 16, h * 16), caption=CAPTIONS[j % len(CAPTIONS)],
                    source_key=str(j), source_shard="bench", stage="256")))


def run(tmp: str, llm: str, zero: str, precision: str, steps: int, budget: int,
        peak: float) -> dict:
    run_dir = os.path.join(tmp, f"{zero}-{precision}")
    cmd = [sys.executable, os.path.join(REPO, "bdt", "train.py"), "--config",
           os.path.join(REPO, "bdt", "configs", "tiny.yaml"), f"run_dir={run_dir}",
           f"model.backbone.path={llm}", f"data.root={tmp}/shards", "data.buffer_size=64",
           "model.head.width=256", "model.head.head_dim=64", "model.pos_max_len=64",
           f"deepspeed.zero_stage={zero[-1]}", f"deepspeed.precision={precision}",
           "deepspeed.grad_accum=1", "checkpoint.every=0", "export=false", "threads=2",
           f"logging.peak_tflops={peak / 1e12}",
           f"stages=[{{name: '256', shards: '{tmp}/shards', steps: {steps}, "
           f"token_budget: {budget}, lr: 1e-4, warmup_steps: 2}}]"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    recs = [r for r in recs if "loss" in r][2:]
    keys = ("tokens_per_s", "images_per_s", "mfu", "step_time_s", "data_wait_frac", "pack_efficiency")
    return {k: float(np.mean([r[k] for r in recs])) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--budget", type=int, default=2048)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        llm = make_tiny_llm(os.path.join(tmp, "llm"), CAPTIONS * 20, hidden=256, layers=4,
                            heads=4, kv_heads=2, intermediate=768, max_position_embeddings=4096)
        make_shards(os.path.join(tmp, "shards"))
        torch.set_num_threads(2)
        peaks = {p: measure_peak_flops(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[p]),
                                       seconds=2.0) for p in ("fp32", "bf16")}
        rows = {f"{z}/{p}": run(tmp, llm, z, p, args.steps, args.budget, peaks[p])
                for z, p in CONFIGS}
    print("matmul peak GFLOP/s: " + ", ".join(f"{p} {v / 1e9:.1f}" for p, v in peaks.items()))
    print(f"{'config':<12} {'tokens/s':>9} {'images/s':>9} {'MFU':>7} {'step s':>7} "
          f"{'data wait':>9} {'packing':>8}")
    for name, r in rows.items():
        print(f"{name:<12} {r['tokens_per_s']:>9.0f} {r['images_per_s']:>9.2f} {r['mfu']:>7.3f} "
              f"{r['step_time_s']:>7.3f} {r['data_wait_frac']:>9.3f} {r['pack_efficiency']:>8.3f}")
    out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "steps": args.steps, "token_budget": args.budget,
           "peak_gflops": {p: v / 1e9 for p, v in peaks.items()}, "results": rows}
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    with open(os.path.join(REPO, "bench", "results", "train_throughput.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
