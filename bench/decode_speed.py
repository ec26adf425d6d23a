"""Next-patch decode speedup (issue 8 item 1) and the KV cache's cost (item 2).

    .venv/bin/python bench/decode_speed.py [--grid 32] [--head-steps 25] [--rounds 2]

Item 1: one tiny backbone (a Qwen3 of hidden 128, 2 layers) and head (width 64, depth 2), built
three times with P = 1, 4, 16 (the head network takes any P; the special tokens differ), each
generating one image of a grid x grid token bucket with KV cache and CFG (scale 7.5, so two
streams), `--head-steps` Euler steps of the head per AR step. The three run interleaved,
`--rounds` times; the figure is the median wall time per image, and the speedup is P=1's over
P's. The limit is P (the AR steps shrink by P); per-step costs that grow with P eat into it.

Item 2: a P = 4 model on a larger backbone (hidden 256, 4 layers: the backbone weighs more
against the head, as in real models) generating with and without the KV cache at growing grids
(16 ... 256 tokens), interleaved; the uncached path recomputes the whole sequence at each AR
step.

Writes bench/results/decode_speed.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from common import CAPTIONS, Run, goal, table

PS = (1, 4, 16)


def build(llm_dir: str, parallel_num: int):
    from bdt.model.ar import BitDanceModel
    from bdt.model.backbone_config import BackboneConfig
    from bdt.model.config import ModelConfig
    from bdt.model.head import HeadConfig

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(path=llm_dir),
                      head=HeadConfig(width=64, depth=2, num_adaln_sets=1, head_dim=32, bits=16),
                      parallel_num=parallel_num, pos_max_len=64, attn_backend="sdpa")
    model = BitDanceModel.from_config(cfg).eval()
    with torch.no_grad():  # a trained-looking head: the zero-init output would ignore the input
        for p in model.head.final_proj.parameters():
            p.normal_(0.0, 0.02)
    return model


def time_generate(model, side: int, head_steps: int, use_cache: bool = True) -> float:
    from bdt.generation.sampling import SamplingConfig, generate

    cfg = SamplingConfig(cfg_scale=7.5, num_steps=head_steps, seed=0, use_cache=use_cache)
    t0 = time.perf_counter()
    generate(model, [CAPTIONS[2]], side, side, cfg)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, default=32, help="token grid side for item 1")
    ap.add_argument("--head-steps", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-grids", type=int, nargs="+", default=[4, 8, 16])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from bdt.model.backbone import make_tiny_llm

    with Run("decode_speed") as run, tempfile.TemporaryDirectory() as tmp:
        llm = make_tiny_llm(os.path.join(tmp, "llm"), CAPTIONS * 20, hidden=128, layers=2,
                            heads=4, kv_heads=2, intermediate=384, max_position_embeddings=4096)
        models = {p: build(llm, p) for p in PS}
        for p in PS:  # warm-up: allocator, kernel choice
            time_generate(models[p], 4, 2)
        times = {p: [] for p in PS}
        for _ in range(args.rounds):
            for p in PS:
                times[p].append(time_generate(models[p], args.grid, args.head_steps))
        med = {p: statistics.median(v) for p, v in times.items()}
        speed = {p: med[1] / med[p] for p in PS}
        table(["P", "AR steps", "s/image", "speedup vs P=1", "limit"],
              [[p, args.grid ** 2 // p, med[p], speed[p], p] for p in PS],
              f"decode, {args.grid}x{args.grid} tokens, CFG 7.5, KV cache, "
              f"{args.head_steps} head steps/AR step, median of {args.rounds}")

        # Item 2 on a backbone that weighs more against its head, as in real models (BitDance-14B:
        # a 14B LLM, a ~1B head); with the tiny one above the head's steps hide the backbone.
        big = make_tiny_llm(os.path.join(tmp, "llm_big"), CAPTIONS * 20, hidden=256, layers=4,
                            heads=4, kv_heads=2, intermediate=768, max_position_embeddings=4096)
        cache_model = build(big, 4)
        time_generate(cache_model, 4, 2)
        cache_rows, cache = [], {}
        for side in args.cache_grids:
            pair = {True: [], False: []}
            for _ in range(args.rounds):
                for use_cache in (True, False):
                    pair[use_cache].append(time_generate(cache_model, side, args.head_steps,
                                                         use_cache))
            c, u = statistics.median(pair[True]), statistics.median(pair[False])
            cache[side * side] = {"cached_s": c, "uncached_s": u, "speedup": u / c}
            cache_rows.append([side * side, c, u, u / c])
        table(["tokens", "cached s", "uncached s", "uncached/cached"], cache_rows,
              "KV cache, P=4, CFG 7.5, backbone hidden 256 x 4 layers")

        from bdt.generation.sampling import SamplingConfig

        default_cached = SamplingConfig().use_cache
        faster = all(v["speedup"] > 1.0 for n, v in cache.items() if n >= 64)
        goals = [
            goal("1. decode speedup P=16 vs P=1", f"{speed[16]:.1f}x (P=4: {speed[4]:.1f}x)",
                 ">= 10x", speed[16] >= 10.0,
                 "per-AR-step fixed cost (Python, HF decoder call, head call overhead)"),
            goal("2. KV cache faster from 64 tokens, default on",
                 ", ".join(f"{n}: {v['speedup']:.1f}x" for n, v in cache.items()),
                 "> 1x from 64, default", faster and default_cached, ""),
        ]
        run.write({"grid": args.grid, "head_steps": args.head_steps, "rounds": args.rounds,
                   "threads": args.threads, "seconds": {str(p): v for p, v in times.items()},
                   "median_s": {str(p): v for p, v in med.items()},
                   "speedup": {str(p): v for p, v in speed.items()},
                   "kv_cache": {str(k): v for k, v in cache.items()},
                   "cache_default": default_cached}, goals)


if __name__ == "__main__":
    main()
