r"""The second failure of single-object prompts: a dark violet dotted texture and no object
(issue 17 part 2). Two measurements:

1. How often. Every image of the given `bdt eval` folders is scored for a fine periodic texture:
   its luminance folded onto one 2x2 cell (the mean over all 2x2 cells) keeps a standard
   deviation above 1.5 grey levels. Drawn images, objects on plain or noisy backgrounds, keep
   below 0.5; the dotted texture sits at 2.5-4.
2. Where it comes from. Training images on a dark background are encoded; their background
   tokens (the top token row) are decoded (a) in place, as the reconstruction, (b) at random
   positions over the whole grid, (c) one of them repeated everywhere. Same score, and a
   picture of the rows (bench/results/texture_images.png).

    python bench/texture_images.py --evals RUN/eval_s0 RUN/eval_s1 ... \
        [--tokenizer demo/tokenizer/export --data demo/data --background dark_gray]

prints both tables and writes bench/results/texture_images.json.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os

import numpy as np
import torch
from PIL import Image

from common import REPO, RESULTS, Run, table

TEXTURE_LEVELS = 1.5  # 2x2-folded luminance std above this = the dotted texture
SHOWN = 8  # training images in the decoding test


def texture_score(image: Image.Image) -> float:
    y = np.asarray(image.convert("RGB"), np.float32).mean(axis=2)
    h, w = (y.shape[0] // 2) * 2, (y.shape[1] // 2) * 2
    return float(y[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(0, 2)).std())


def count_textures(eval_dir: str) -> dict:
    files = sorted(glob.glob(os.path.join(eval_dir, "images", "*.png")))
    if not files:
        raise FileNotFoundError(f"{eval_dir}/images: no images (a bdt eval output folder?)")
    textured = [os.path.basename(f) for f in files if texture_score(Image.open(f)) > TEXTURE_LEVELS]
    return {"eval": eval_dir, "images": len(files), "textured": len(textured),
            "rate": len(textured) / len(files), "files": textured}


def dark_training_images(data: str, background: str, size: int) -> list[Image.Image]:
    from bdt.data.images import resize_center_crop
    from bdt.data.tars import iter_shard

    found = []
    for url in sorted(glob.glob(os.path.join(data, "*.tar"))):
        for sample, _, _ in iter_shard(url):
            meta = json.loads(sample["json"])
            if meta.get("background") == background:
                image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
                found.append(Image.fromarray(resize_center_crop(image, (size, size))))
            if len(found) == SHOWN:
                return found
    raise ValueError(f"{data}: fewer than {SHOWN} images on a {background} background")


def decode_out_of_place(tokenizer: str, images: list[Image.Image]) -> dict[str, list[Image.Image]]:
    from bdt.generation.grid import to_pil
    from bdt.tokenizer.io import load_tokenizer

    tok = load_tokenizer(tokenizer).eval()
    x_BCHW = torch.tensor(np.stack([np.asarray(i) for i in images]), dtype=torch.float32)
    bits_BhwC = tok.encode(x_BCHW.permute(0, 3, 1, 2) / 127.5 - 1.0)
    B, h, w, C = bits_BhwC.shape
    top_BwC = bits_BhwC[:, 0]
    pick = torch.randint(0, w, (B, h * w), generator=torch.Generator().manual_seed(0))
    scattered = torch.stack([top_BwC[b, pick[b]] for b in range(B)]).reshape(B, h, w, C)
    repeated = top_BwC[:, :1].expand(B, h * w, C).reshape(B, h, w, C).contiguous()

    def decode(bits: torch.Tensor) -> list[Image.Image]:
        return to_pil(tok.decode(bits, generator=torch.Generator().manual_seed(0)))

    return {"training images": images, "decoded in place": decode(bits_BhwC),
            "background tokens at random places": decode(scattered),
            "one background token everywhere": decode(repeated)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", nargs="+", required=True, help="bdt eval output folders")
    parser.add_argument("--tokenizer", default=os.path.join(REPO, "demo", "tokenizer", "export"))
    parser.add_argument("--data", default=os.path.join(REPO, "demo", "data"),
                        help="the raw shapes shards the tokenizer was trained on")
    parser.add_argument("--background", default="dark_gray")
    parser.add_argument("--px", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with Run("texture_images") as run:
        counts = [count_textures(d) for d in args.evals]
        table(["eval folder", "images", "textured", "rate"],
              [(c["eval"], c["images"], c["textured"], c["rate"]) for c in counts],
              title=f"images whose 2x2-folded luminance std > {TEXTURE_LEVELS}")
        rows = decode_out_of_place(args.tokenizer,
                                   dark_training_images(args.data, args.background, args.px))
        scores = {name: [texture_score(i) for i in imgs] for name, imgs in rows.items()}
        table(["decoded", "mean score", "textured"],
              [(name, float(np.mean(s)), sum(v > TEXTURE_LEVELS for v in s)) for name, s in scores.items()],
              title=f"{SHOWN} training images on {args.background}: their top-row tokens")
        picture = Image.new("RGB", (args.px * SHOWN, args.px * len(rows)))
        for r, imgs in enumerate(rows.values()):
            for c, image in enumerate(imgs):
                picture.paste(image.resize((args.px, args.px)), (args.px * c, args.px * r))
        os.makedirs(RESULTS, exist_ok=True)  # run.write makes it too, but after the picture
        picture.save(os.path.join(RESULTS, "texture_images.png"))
        path = run.write({"texture_levels": TEXTURE_LEVELS, "evals": counts,
                          "decoding": {"background": args.background, "scores": scores,
                                       "rows": list(rows)}}, goals=[])
    print(f"wrote {path} and texture_images.png beside it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
