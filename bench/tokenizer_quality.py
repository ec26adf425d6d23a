"""Tokenizer quality on the embedded shapes data (issue 3 acceptance).

Trains `tokenizers/shapes_small.yaml` through the real entry point (`tokenizers/train.py`, one
process, DeepSpeed ZeRO-0, fp32) for at most --minutes of wall clock, then evaluates the exported
EMA tokenizer on held-out 128 px shapes images (a different seed): PSNR, SSIM and per-bit firing
rates. Goal: PSNR >= 28 dB and every bit +1 on 5-95% of tokens. Prints a table and writes JSON.

    python bench/tokenizer_quality.py [--minutes 8] [key=value ...]   (overrides for the trainer)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_data(out: str, num: int, seed: int) -> str:
    from bdt.data.shapes import ShapesConfig
    from bdt.data.shards import generate

    if not os.path.exists(os.path.join(out, "manifest.json")):
        generate(ShapesConfig(out=out, num=num, sizes=["128"], per_shard=500, seed=seed,
                              format="png", workers=2))
    return os.path.join(out, "shapes-*.tar")


def evaluate(export_dir: str, shards: str, num: int) -> dict:
    from bdt.data.raw import RawImageStream, expand_shards
    from bdt.tokenizer.image_metrics import psnr, ssim
    from bdt.tokenizer.io import load_tokenizer

    model = load_tokenizer(export_dir).eval()
    stream = iter(RawImageStream(expand_shards(shards), 128, 16, 0, 1))
    psnrs, ssims, bits = [], [], []
    with torch.no_grad():
        while sum(len(p) for p in psnrs) < num:
            images = next(stream)["images"]
            b = model.encode(images)
            recon = model.decode(b).clamp(-1, 1)
            psnrs.append(psnr(recon, images))
            ssims.append(ssim(recon, images))
            bits.append(b.reshape(-1, b.shape[-1]))
    rates = torch.cat(bits).float().mean(0)
    p, s = torch.cat(psnrs)[:num], torch.cat(ssims)[:num]
    return {"images": num, "psnr_db": p.mean().item(), "psnr_db_min": p.min().item(),
            "ssim": s.mean().item(), "bit_rate_min": rates.min().item(), "bit_rate_max": rates.max().item(),
            "bits_outside_5_95": int(((rates < 0.05) | (rates > 0.95)).sum()),
            "bit_rates": [round(r, 4) for r in rates.tolist()]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--config", default=os.path.join(REPO, "tokenizers", "shapes_small.yaml"))
    parser.add_argument("--work", default="/tmp/bdt-bench-tokenizer")
    parser.add_argument("--train-num", type=int, default=4000)
    parser.add_argument("--eval-num", type=int, default=128)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "tokenizer_quality.json"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train_shards = make_data(os.path.join(args.work, "train"), args.train_num, seed=0)
    eval_shards = make_data(os.path.join(args.work, "eval"), args.eval_num, seed=987654)
    # Defaults chosen for a CPU budget of minutes: 64 px random crops of the 128 px images (4x
    # cheaper per step than full images, same pixel statistics as the 128 px evaluation); a
    # constant LR after warmup, so the run uses the whole time budget whatever the machine's
    # speed (the time limit ends it; a step-count horizon would have to be guessed); the
    # quantizer loss at 0.1 so the entropy terms don't dominate the first minutes.
    overrides = ["data.size=64", "data.resize=128", "data.random_crop=true", "data.num_workers=1",
                 "deepspeed.micro_batch_size=16", "optim.lr=2e-3", "optim.warmup_steps=50",
                 "optim.schedule=constant", "ema_decay=0.995", "loss.quantizer_weight=0.1",
                 "log.every=25", "log.image_every=500", "ckpt.every=100000", "ckpt.keep_last=1"]
    overrides += args.overrides
    steps = 1_000_000
    run = os.path.join(args.work, f"run-{int(time.time())}")
    cmd = [sys.executable, os.path.join(REPO, "tokenizers", "train.py"), "--config", args.config,
           *overrides, f"steps={steps}", f"time_limit_min={args.minutes}", f"out_dir={run}",
           f"data.shards={train_shards}"]
    env = dict(os.environ, OMP_NUM_THREADS="2", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None), env.pop("RANK", None)
    print(f"training for {args.minutes} min -> {run}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    train_min = (time.time() - t0) / 60
    with open(os.path.join(run, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    result = {"config": os.path.relpath(args.config, REPO), "overrides": overrides,
              "steps_done": last["step"], "train_wall_min": round(train_min, 2),
              "train_images_per_s": last.get("items_per_s"), "train_last_psnr_64px": last.get("psnr"),
              "cpu_threads": 2, "eval": evaluate(os.path.join(run, "export"), eval_shards, args.eval_num),
              "goal": {"psnr_db": 28.0, "bit_rate_range": [0.05, 0.95]}}
    ev = result["eval"]
    result["goal_met"] = ev["psnr_db"] >= 28.0 and ev["bits_outside_5_95"] == 0
    rows = [("steps done", result["steps_done"]),
            ("train wall time (min)", f"{train_min:.2f}"),
            ("train images/s", f"{result['train_images_per_s'] or 0:.1f}"),
            ("held-out images (128 px)", ev["images"]),
            ("PSNR (dB), mean / min", f"{ev['psnr_db']:.2f} / {ev['psnr_db_min']:.2f}"),
            ("SSIM", f"{ev['ssim']:.4f}"),
            ("bit firing rate min / max", f"{ev['bit_rate_min']:.3f} / {ev['bit_rate_max']:.3f}"),
            ("bits outside 5-95%", ev["bits_outside_5_95"]),
            ("goal met (PSNR >= 28, all bits 5-95%)", result["goal_met"])]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
