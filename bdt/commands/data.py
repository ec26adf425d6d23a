"""`bdt data ...` commands: `bdt data shapes` writes the embedded captioned dataset (system §4);
`bdt data verify` checks an extraction output's shards against its manifest."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="make or inspect datasets")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    shapes = sub.add_parser(
        "shapes", help="write the procedural 'shapes' dataset as webdataset shards",
        description="Render captioned images of coloured shapes (deterministic from --seed) "
                    "into webdataset tars KEY.jpg|png + KEY.txt + KEY.json, locally or to s3://.")
    shapes.add_argument("--out", required=True, help="output directory or fsspec URL (s3://...)")
    shapes.add_argument("--num", type=int, required=True, help="number of samples")
    shapes.add_argument("--size", nargs="+", default=["256"], metavar="S|WxH",
                        help="image size(s); each sample picks one (default 256)")
    shapes.add_argument("--per-shard", type=int, default=1000, help="samples per tar (1000)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--format", choices=["jpg", "png"], default="jpg")
    shapes.add_argument("--jpeg-quality", type=int, default=95)
    shapes.add_argument("--workers", type=int, default=1, help="processes writing shards (1)")
    shapes.set_defaults(func=_shapes)
    verify = sub.add_parser(
        "verify", help="check every token shard of an extraction output against its index.json",
        description="Read every shard that OUTPUT/index.json lists and compare its size and sha256 "
                    "with the manifest, and rejects.jsonl with its reject count (training checks "
                    "only the sizes and counts, at every start). Exit 0 when all match, 1 naming "
                    "each file that does not (or an extraction that did not finish), 2 on an "
                    "unusable output (a damaged manifest: counts that do not add up, a shard "
                    "missing from a complete one).")
    verify.add_argument("output", help="extraction output directory or fsspec URL (s3://...)")
    verify.add_argument("--family", action="append", default=[],
                        help="check only this shard family (repeatable; default: all)")
    verify.add_argument("--workers", type=int, default=8, help="shards read at once (8)")
    verify.set_defaults(func=_verify)


def _shapes(args: argparse.Namespace) -> int:
    from bdt.data.shapes import ShapesConfig
    from bdt.data.shards import generate

    cfg = ShapesConfig(out=args.out, num=args.num, sizes=list(args.size),
                       per_shard=args.per_shard, seed=args.seed, format=args.format,
                       jpeg_quality=args.jpeg_quality, workers=args.workers)
    manifest = generate(cfg)
    print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shard(s) "
          f"to {cfg.out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from bdt.data.shard_source import verify

    if args.workers < 1:  # as `data shapes --workers`, rather than quietly reading with one
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    with tqdm(unit="shard", desc="verify", file=sys.stderr) as bar:
        checked, problems = verify(args.output, args.family, args.workers, lambda: bar.update(1))
    for problem in problems:
        print(f"BAD {problem}")
    print(f"verified {checked} shard(s) of {args.output}: "
          + (f"{len(problems)} problem(s), named above" if problems else "all match index.json"))
    return 1 if problems else 0
