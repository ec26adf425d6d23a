"""How much random bit noise the demo tokenizer's pictures survive, judged (issue 7, limits).

The demo's AR model predicts token bits with ~92% per-bit accuracy (teacher-forced), and its
images fail the shapes judge mostly on the shape. Is that the bit error rate? This flips a
random share of the bits of real images' tokens (the tokenizer's own encodings of fresh shapes
samples), decodes, and runs the judge: if the pictures survive the model's error rate, its
failures are structured (whole outlines), not scattered bits. Scores per category and overall
(mean of categories) per flip rate; prints a table, writes bench/results/token_noise.json.

    python bench/token_noise.py [--tokenizer demo/tokenizer/export] [--num 240] [--px 64]
"""

from __future__ import annotations

import argparse
import os

import torch

from common import REPO, Run, table
from tokenizer_quality import judge_reconstructions

RATES = (0.0, 0.01, 0.02, 0.04, 0.08, 0.16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=os.path.join(REPO, "demo", "tokenizer", "export"),
                        help="a tokenizer export (default: the one `make demo` trained)")
    parser.add_argument("--num", type=int, default=240, help="fresh samples (all categories)")
    parser.add_argument("--px", type=int, default=64, help="image side (the demo's: 64)")
    args = parser.parse_args()
    if args.num < 1:
        parser.error(f"--num must be >= 1, got {args.num}")
    torch.set_num_threads(2)
    with Run("token_noise") as run:
        by_rate = {}
        for rate in RATES:
            judged = judge_reconstructions(args.tokenizer, args.num, args.px, flip_rate=rate)
            by_rate[rate] = judged["reconstructions"]
        categories = list(by_rate[0.0]["per_category"])
        table(["bits flipped", "overall", *categories],
              [(f"{r:.0%}", s["overall"], *(s["per_category"][c] for c in categories))
               for r, s in by_rate.items()],
              title=f"shapes judge on reconstructions with flipped bits ({args.num} samples, "
                    f"{args.px} px)")
        originals = judged["originals"]["overall"]
        print(f"originals (no tokenizer): overall {originals:.3f}")
        path = run.write({"tokenizer": os.path.relpath(args.tokenizer, REPO), "num": args.num,
                          "px": args.px, "originals": judged["originals"],
                          "reconstructions_by_flip_rate": {str(r): s for r, s in by_rate.items()}},
                         goals=[])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
