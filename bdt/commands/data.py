"""`bdt data ...` commands: `bdt data shapes` writes the embedded captioned dataset (system §4)."""

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
