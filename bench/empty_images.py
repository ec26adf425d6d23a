"""Why do single-object prompts sometimes give an empty image? (issue 17 part 2)

For each guidance setting this samples the 40 single-object prompts of the shapes suite, judges
the images, and measures how far each generated token lies from the tokens the model was trained
on: the Hamming distance (in bits) to the nearest token of the training shards. A token farther
than a few bits from every training token is one the model has never seen as an input, so the
AR steps after it run off the data. The table splits the distance by AR step (the first patches,
top-left, are background in nearly every training image) and by empty vs non-empty images.

    python bench/empty_images.py [--model demo/run/export] [--tokens demo/tokens --family 64]

prints the table and writes bench/results/empty_images.json.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import numpy as np
import torch

from common import REPO, Run, table

SETTINGS = ((1.0, "constant"), (2.0, "constant"), (3.0, "constant"), (3.0, "linear"))
FIRST_STEPS = 4  # AR steps counted as "first patches"
FAR_BITS = 3  # a token farther than this from every training token is off the data


def training_tokens(root: str, family: str) -> np.ndarray:
    """Every distinct token of the family's shards as a uint64 bit pattern."""
    from bdt.data.shard_source import list_shards
    from bdt.data.token_shards import iter_token_shard

    seen: set[int] = set()
    for url in list_shards(root, family).urls:
        for s in iter_token_shard(url):
            packed = s.bits_hwB.reshape(-1, s.bits_hwB.shape[-1])  # bits packed 8 per byte
            seen.update(int.from_bytes(row.tobytes(), "little") for row in packed)
    return np.array(sorted(seen), dtype=np.uint64)


def as_patterns(bits_NC: np.ndarray) -> np.ndarray:
    """bool [N, C] -> uint64 patterns, packed as the shards pack them."""
    from bdt.tokenizer.bits import pack_bits

    return np.array([int.from_bytes(row.tobytes(), "little") for row in pack_bits(bits_NC)],
                    dtype=np.uint64)


def mean_where(v: np.ndarray, mask: np.ndarray) -> float | None:
    """The mean of v where mask holds; None (JSON null) where it never does: a setting with no
    empty image has no distance for empty images, and NaN is not JSON."""
    return float(v[mask].mean()) if mask.any() else None


def nearest_distance(patterns: np.ndarray, known: np.ndarray, chunk: int = 256) -> np.ndarray:
    out = np.empty(len(patterns), dtype=np.int64)
    for i in range(0, len(patterns), chunk):
        xor = patterns[i:i + chunk, None] ^ known[None, :]
        out[i:i + chunk] = np.bitwise_count(xor).min(axis=1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(REPO, "demo", "run", "export"))
    parser.add_argument("--tokens", default=os.path.join(REPO, "demo", "tokens"))
    parser.add_argument("--family", default="64")
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="head sampler steps (the demo's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    torch.set_num_threads(2)
    from bdt.eval.judge import judge_image
    from bdt.eval.run import select
    from bdt.eval.suite import load_suite
    from bdt.generation.load import load_trained
    from bdt.model.sequence import to_sequence_order
    from bdt.generation.sampling import SamplingConfig, generate
    from bdt.generation.grid import to_pil

    known = training_tokens(args.tokens, args.family)
    trained = load_trained(args.model)
    items = select(load_suite(), ["single_object"])
    prompts = [it["prompt"] for it in items]
    h, w = trained.token_grid(args.px, args.px)
    ps = trained.model.cfg.patch_size
    P = trained.model.cfg.parallel_num
    rows, results = [], []
    with Run("empty_images") as run:
        for scale, schedule in SETTINGS:
            empty, dist_first, dist_rest, far_first = [], [], [], []
            for seed in args.seeds:
                cfg = SamplingConfig(cfg_scale=scale, cfg_schedule=schedule,
                                     num_steps=args.steps, seed=seed)
                bits_BhwC = generate(trained.model, prompts, h, w, replace(cfg, seed=seed))
                gen = torch.Generator().manual_seed(seed)
                images = to_pil(trained.decoder.decode(bits_BhwC, generator=gen))
                for item, image, bits_hwC in zip(items, images, bits_BhwC):
                    found = judge_image(image, item["spec"]).detected
                    seq_NC = to_sequence_order(bits_hwC, ps).numpy()
                    d = nearest_distance(as_patterns(seq_NC), known)
                    first = d[:FIRST_STEPS * P]
                    empty.append(not found)
                    dist_first.append(first.mean())
                    dist_rest.append(d[FIRST_STEPS * P:].mean())
                    far_first.append((first > FAR_BITS).mean())
            empty_a, df, dr, ff = map(np.array, (empty, dist_first, dist_rest, far_first))
            result = {"cfg_scale": scale, "cfg_schedule": schedule, "images": len(empty_a),
                      "empty_rate": float(empty_a.mean()),
                      "first_patches_bits_off": {"empty": mean_where(df, empty_a),
                                                 "drawn": mean_where(df, ~empty_a)},
                      "later_patches_bits_off": {"empty": mean_where(dr, empty_a),
                                                 "drawn": mean_where(dr, ~empty_a)},
                      "first_patches_far_share": float(ff.mean())}
            results.append(result)
            rows.append((f"{scale:g} {schedule}", result["empty_rate"],
                         result["first_patches_bits_off"]["empty"],
                         result["first_patches_bits_off"]["drawn"],
                         result["later_patches_bits_off"]["empty"],
                         result["later_patches_bits_off"]["drawn"], result["first_patches_far_share"]))
        table(["CFG", "empty", "first bits off (empty)", "first (drawn)", "later (empty)",
               "later (drawn)", f"first > {FAR_BITS} bits"], rows,
              title=f"single-object prompts x {len(args.seeds)} seeds; distance to the nearest of "
                    f"{len(known)} training tokens; first = the first {FIRST_STEPS} AR steps")
        path = run.write({"model": os.path.relpath(args.model, REPO), "training_tokens": len(known),
                          "first_steps": FIRST_STEPS, "far_bits": FAR_BITS, "settings": results},
                         goals=[])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
