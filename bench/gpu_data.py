"""The small dataset scripts/gpu_check.sh trains on, made from the repo alone, and the extraction
worker's encoder timed on the device (issue 16 part 4).

    python bench/gpu_data.py --raw RAW --out OUT [--tokenizer DIR] [--device cuda] [--batch 64]
                             [--config configs/extract/demo_128.yaml]

RAW: shapes images (`bdt data shapes --size 128`). Writes into OUT:
  tokenizer/  without --tokenizer, a randomly initialised image tokenizer of the demo's geometry
              (configs/tokenizer/shapes_d8.yaml: 8x down, 32 bits): its bits carry no picture, but every
              shape, dtype and code path is the trained one's (gpu_check.sh); --tokenizer DIR
              (a trained one, e.g. demo/tokenizer/export) is used in place (gpu_quality.sh)
  tokens/     token shards of families "32" and "64" (4x4 and 8x8 tokens; more with a --config
              merged after configs/extract/demo.yaml), written by
              bdt.extract.worker.ShardEncoder called directly (the Ray actor's class, no Ray)
              on --device
  llm/        the demo's tiny Qwen3 + caption tokenizer (`bdt model init-tiny`'s function)
  data.json   images, seconds and images/s of the extraction on the device
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import torch
import yaml

from common import REPO, machine, write_json


def random_tokenizer(out: str, seed: int = 0) -> str:
    from bdt.tokenizer.autoencoder import BinaryAutoencoder
    from bdt.tokenizer.config import TokenizerConfig
    from bdt.tokenizer.io import save_tokenizer

    geometry = yaml.safe_load(open(os.path.join(REPO, "configs", "tokenizer", "shapes_d8.yaml")))["model"]
    torch.manual_seed(seed)
    save_tokenizer(BinaryAutoencoder(TokenizerConfig(**geometry)), out)
    return out


def extract(raw: str, out: str, tokenizer: str, device: str, batch: int,
            configs: tuple[str, ...] = ()) -> dict:
    """Every raw shard through ShardEncoder.process, as a Ray actor would run it; `configs`
    merged after the demo's extraction config."""
    from bdt.config import load, to_dict
    from bdt.extract.config import ExtractConfig
    from bdt.extract.run import plan
    from bdt.extract.worker import ShardEncoder

    cfg = load(ExtractConfig, [os.path.join(REPO, "configs", "extract", "demo.yaml"), *configs],
               [f"inputs={raw}/*.tar", f"output={out}", f"tokenizer={tokenizer}",
                f"batch_size={batch}", f"gpus_per_actor={1 if device == 'cuda' else 0}",
                "decode_threads=4"])
    units, stages, _, fingerprint = plan(cfg)
    encoder = ShardEncoder(to_dict(cfg), fingerprint, stages)
    if encoder.device != device:
        raise RuntimeError(f"the extraction worker chose {encoder.device}, asked for {device}")
    if len(units) < 2:
        raise ValueError(f"{raw}: {len(units)} input shard(s); the timing needs 2 or more "
                         "(one warms up)")
    encoder.process(units[0].to_dict())  # warm-up: cuDNN / oneDNN kernel choice
    t0 = time.perf_counter()
    images = 0
    for unit in units[1:]:
        result = encoder.process(unit.to_dict())
        images += next(iter(result["stages"].values()))["inputs"]
    seconds = time.perf_counter() - t0
    return {"device": device, "dtype": str(next(encoder.model.parameters()).dtype),
            "units": len(units), "timed_images": images, "seconds": seconds,
            "images_per_s": images / max(seconds, 1e-9),
            "families": {s: len(glob.glob(os.path.join(out, s, "*.tar"))) for s in stages}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", required=True, help="shapes image shards (bdt data shapes)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default="",
                    help="a trained image tokenizer (export dir); default: a random-weight one")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64, help="images per encoder call")
    ap.add_argument("--config", action="append", default=[],
                    help="an extraction config merged after configs/extract/demo.yaml (repeatable)")
    args = ap.parse_args()
    from bdt.commands.model import read_captions
    from bdt.model.backbone import make_tiny_llm

    tokenizer = args.tokenizer or random_tokenizer(os.path.join(args.out, "tokenizer"))
    stats = extract(args.raw, os.path.join(args.out, "tokens"), tokenizer, args.device,
                    args.batch, tuple(args.config))
    make_tiny_llm(os.path.join(args.out, "llm"), read_captions(args.raw, 2000))
    stats["machine"] = machine()
    write_json(os.path.join(args.out, "data.json"), stats)
    print(f"extraction on {stats['device']} ({stats['dtype']}): {stats['timed_images']} images "
          f"in {stats['seconds']:.2f} s = {stats['images_per_s']:.0f} images/s after one warm-up "
          f"shard; shards per family {stats['families']}", flush=True)


if __name__ == "__main__":
    main()
