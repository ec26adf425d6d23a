"""How much of a trained model's vision loss is memorised? Its loss on the token shards it was
trained on against shards of images it never saw (issue 17: the recipe's data side).

Both sets are read the way a training stage reads them (packed rows of `--budget` tokens, the
model's P, no caption dropout) and scored in eval mode (no exposure-bias flips) with the same
flow times and noise for row k of either set, so the difference is the data's alone. A held-out
loss well above the training loss means the model has learnt its images rather than the prompt's
rules: more distinct images (or fewer passes over them) is then the lever, not more steps.

    python bench/heldout_loss.py --model demo/run/export --train 'demo/tokens/64/*.tar' \\
        --heldout 'HELD/tokens/64/*.tar' [--rows 80]

HELD: token shards of images the run did not train on, e.g. `bdt data shapes --seed 7` images
through the extraction (`bench/gpu_data.py --raw RAW --out HELD --tokenizer
demo/tokenizer/export --device cpu` writes HELD/tokens/64). Both sets: a folder or glob of one
family's shards (the family the model's last stage trained on). Prints the table and writes
bench/results/heldout_loss.json.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from common import REPO, Run, table


def loss_on(model, urls: list[str], rows: int, budget: int, seed: int = 0) -> dict:
    """Mean losses of the first `rows` packed rows of `urls` (stream order of `seed`); row k's
    flow times and noise come from a generator seeded k, whatever the shards."""
    from bdt.model.sequence import PackedSequence
    from bdt.training.ar.stage_stream import stage_packer
    from bdt.training.ar.stage_rows import CaptionMeasure, StageRows

    packer = stage_packer(model, model.cfg.parallel_num, budget, caption_dropout=0.0)
    measure = CaptionMeasure(model.tokenizer, packer, model.cfg.pos_max_len)
    source = StageRows(urls, 0, 1, budget, 256, seed, model.cfg.head.bits, measure)()
    vision, text, accuracy, images = [], [], [], 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for k in range(rows):
                tensors, extra = source.next_row()
                out = model(PackedSequence(**tensors), generator=torch.Generator().manual_seed(k),
                            row_len=budget)
                vision.append(float(out["vision"]))
                text.append(float(out["text_ce"]))
                accuracy.append(float(out["bit_accuracy"]))
                images += len(extra["keys"])
    finally:
        model.train(was_training)
    mean = sum(vision) / rows
    spread = math.sqrt(sum((v - mean) ** 2 for v in vision) / (rows - 1)) if rows > 1 else 0.0
    return {"rows": rows, "images": images, "vision": mean, "vision_sem": spread / math.sqrt(rows),
            "text_ce": sum(text) / rows, "bit_accuracy": sum(accuracy) / rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(REPO, "demo", "run", "export"))
    ap.add_argument("--train", default=os.path.join(REPO, "demo", "tokens", "64", "*.tar"),
                    help="shards the model trained on (a folder or glob of one family)")
    ap.add_argument("--heldout", required=True, help="shards of images the model never saw")
    ap.add_argument("--rows", type=int, default=80, help="packed rows scored per set")
    ap.add_argument("--budget", type=int, default=1024, help="tokens per packed row")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.rows < 1 or args.budget < 1:
        ap.error("--rows and --budget must be >= 1")
    torch.set_num_threads(args.threads)
    from bdt.data.shard_source import list_shards
    from bdt.generation.load import load_trained

    model = load_trained(args.model).model

    with Run("heldout_loss") as run:
        sets = {name: {"source": source, "shards": len(urls),
                       **loss_on(model, urls, args.rows, args.budget)}
                for name, source in (("train", args.train), ("heldout", args.heldout))
                for urls in [list_shards(source).urls]}
        gap = sets["heldout"]["vision"] / sets["train"]["vision"] - 1.0
        table(["set", "shards", "rows", "images", "vision loss", "+-", "text CE", "bit acc"],
              [(n, s["shards"], s["rows"], s["images"], s["vision"], s["vision_sem"], s["text_ce"],
                s["bit_accuracy"]) for n, s in sets.items()],
              title=f"{args.model}: held-out vision loss {100 * gap:+.1f}% against the training "
                    f"shards' (eval mode, the same draws per row)")
        path = run.write({"model": os.path.abspath(args.model), "budget": args.budget,
                          "sets": sets, "heldout_gap": gap}, goals=[])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
