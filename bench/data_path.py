"""Packing efficiency of the token stream at the stage sizes (issue 8 item 5, second half).

    .venv/bin/python bench/data_path.py [--batches 600]

The stages of configs/train/ar_progressive.yaml (256 / 512 / 1024 px, token budgets 16384 /
16384 / 32768, P = 16, shuffle buffer 512) over shapes data: captions and bucket choice as
`bdt data shapes` makes them (uniform over the stage's buckets, BitDance's 7 / 11 aspect
presets), a 16x tokenizer (random bits: packing only sees lengths). Each stage's TokenStream
(the trainer's, with the trainer's measure function) packs `--batches` micro-batches:
  efficiency = real tokens / budgeted tokens (goal >= 97%)
600 batches turn the 512-sample buffer over ~9 times at 1024 px: the packer prefers longer
samples, so the buffer drifts toward shorter ones, and the steady state is what counts.
The other half of item 5 (stream samples/s vs what the step consumes) is measured beside a
real training step, in bench/train_throughput.py. Writes bench/results/data_path.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import yaml

from common import REPO, Run, goal, table, write_token_shard

DOWNSAMPLE, P = 16, 16


def make_shards(out: str, base: int, n: int) -> None:
    from bdt.data.buckets import make_buckets
    from bdt.data.shapes import make_sample

    buckets = make_buckets(base, DOWNSAMPLE * 4)  # whole 4x4 patches of tokens
    rng = np.random.default_rng(base)

    def samples():
        for i in range(n):
            w, h = buckets[int(rng.integers(len(buckets)))]
            bits = rng.integers(0, 256, (h // DOWNSAMPLE, w // DOWNSAMPLE, 4), dtype=np.uint8)
            yield bits, (w, h), make_sample(0, i, [(64, 64)])[1]  # the caption (small render)

    write_token_shard(os.path.join(out, "000000.tar"), samples(), str(base))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=600)
    ap.add_argument("--samples", type=int, default=3000, help="per stage (the stream loops)")
    args = ap.parse_args()
    from bdt.data.shapes import make_sample
    from bdt.data.token_stream import TokenStream
    from bdt.model.sequence import SequencePacker
    from bdt.model.text_tokenizer import add_special_tokens, encode, make_text_tokenizer, prompt_ids

    plan = yaml.safe_load(open(os.path.join(REPO, "configs", "train", "ar_progressive.yaml")))
    buffer = plan["data"]["buffer_size"]
    with Run("data_path") as run, tempfile.TemporaryDirectory() as tmp:
        captions = [make_sample(0, i, [(64, 64)])[1] for i in range(300)]
        tok = make_text_tokenizer(os.path.join(tmp, "tok"), captions, 384)
        special = add_special_tokens(tok, P)
        rows = {}
        for stage in plan["stages"]:
            base, budget = int(stage["name"]), int(stage["token_budget"])
            shards = os.path.join(tmp, f"s{base}")
            make_shards(shards, base, args.samples)
            packer = SequencePacker(special, prompt_ids(tok), P, max_len=budget)

            def measure(sample, packer=packer):
                sample.caption_ids = np.asarray(encode(tok, sample.caption), dtype=np.int32)
                h, w = sample.grid
                return packer.sample_len(len(packer.prompt_ids(sample.caption_ids.tolist())), h, w)

            stream = TokenStream([os.path.join(shards, "000000.tar")], 0, 1, budget, measure,
                                 buffer_size=buffer, seed=0, bits_per_token=32)
            t0 = time.perf_counter()
            per_batch = [len(stream.next_batch().samples) for _ in range(args.batches)]
            seconds = time.perf_counter() - t0
            c = stream.counters
            rows[stage["name"]] = {"token_budget": budget, "buffer": buffer,
                                   "efficiency": c.efficiency, "samples_per_batch":
                                   float(np.mean(per_batch)), "oversize": c.oversize,
                                   "samples_per_s": c.samples_out / seconds}
        table(["stage px", "budget", "samples/batch", "efficiency", "stream samples/s"],
              [[k, r["token_budget"], r["samples_per_batch"], r["efficiency"], r["samples_per_s"]]
               for k, r in rows.items()],
              f"packing, ar_progressive.yaml stages, P={P}, buffer {buffer}, "
              f"{args.batches} batches")
        worst = min(r["efficiency"] for r in rows.values())
        goals = [goal("5b. packing efficiency at stage sizes",
                      ", ".join(f"{k}: {r['efficiency']:.1%}" for k, r in rows.items()), ">= 97%",
                      worst >= 0.97, "" if worst >= 0.97 else "sample granularity: only ~8 "
                      "(1024 px) or ~16 (512 px) samples fit a budget, and no buffered sample "
                      "is short enough for the gap left")]
        run.write({"stages": rows, "batches": args.batches}, goals)


if __name__ == "__main__":
    main()
