"""`bdt tokenizer encode|decode`: images <-> bit arrays with a saved tokenizer.

encode: PNG/JPEG files (all the same size, a multiple of the downsample factor) -> .npy array
        N x h x w x C uint8 with 0/1 (1 = +1); pixels scaled as x / 127.5 - 1.
decode: that array -> OUTDIR/000000.png, 000001.png, ... (OUTDIR new or empty unless
        --overwrite; written whole as `bdt sample` writes its folder).
Paths may be local or fsspec URLs.
"""

from __future__ import annotations

import argparse
import os
import posixpath


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="encode images to binary tokens and decode them back")
    sub = parser.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")

    enc = sub.add_parser("encode", help="images -> bits .npy (N x h x w x C, 0/1)")
    enc.add_argument("--tokenizer", required=True, help="tokenizer directory (config.json + weights)")
    enc.add_argument("--images", required=True, nargs="+", help="image files of one common size")
    enc.add_argument("--out", required=True, help="output .npy path")
    enc.add_argument("--batch-size", type=int, default=8)
    enc.set_defaults(func=_encode)

    dec = sub.add_parser("decode", help="bits .npy -> PNG files")
    dec.add_argument("--tokenizer", required=True, help="tokenizer directory (config.json + weights)")
    dec.add_argument("--bits", required=True, help=".npy of N x h x w x C with 0/1 values")
    dec.add_argument("--out", required=True, help="output directory for PNGs (new or empty)")
    dec.add_argument("--overwrite", action="store_true",
                     help="write into a non-empty --out, replacing the files of the same names")
    dec.add_argument("--batch-size", type=int, default=8)
    dec.add_argument("--seed", type=int, default=0, help="noise seed for a generative decoder")
    dec.set_defaults(func=_decode)


MAX_PIXELS = 100_000_000  # as the training readers: a few KB of PNG may claim far more


def _read_image(url: str):
    """RGB pixels by the training data's policy (bdt.data.images: EXIF orientation, alpha and
    colour keys on white, 16-bit rescaled, a pixel limit read from the header)."""
    import numpy as np

    from bdt.data.images import ImageRejected, decode_rgb, open_image
    from bdt.storage import read_bytes

    try:
        img, size = open_image(read_bytes(url), max_pixels=MAX_PIXELS, min_side=1)
        return np.asarray(decode_rgb(img, size))
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {url}") from None
    except (ImageRejected, OSError) as exc:
        raise ValueError(f"cannot read image {url}: {exc}") from None


def _check_batch_size(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")


def _encode(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from bdt import storage
    from bdt.tokenizer.io import load_tokenizer

    _check_batch_size(args)
    # Before the work, not at the final write: a folder, or a parent that is a file or read-only.
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a directory; give the .npy file to write")
    storage.check_writable(posixpath.dirname(args.out) or ".")
    model = load_tokenizer(args.tokenizer)
    arrays = [_read_image(url) for url in args.images]
    first = arrays[0].shape[:2]
    for url, arr in zip(args.images, arrays):
        if arr.shape[:2] != first:
            raise ValueError(f"all images must share one size: {args.images[0]} is {first[0]}x{first[1]}, "
                             f"{url} is {arr.shape[0]}x{arr.shape[1]} (HxW)")
    chunks = []
    for start in range(0, len(arrays), args.batch_size):
        batch = np.stack(arrays[start:start + args.batch_size])
        images_BCHW = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1
        try:
            chunks.append(model.encode(images_BCHW).numpy().astype(np.uint8))
        except ValueError as exc:
            raise ValueError(f"{args.images[start]}: {exc}") from None
    bits = np.concatenate(chunks)
    with storage.open_atomic(args.out) as f:
        np.save(f, bits, allow_pickle=False)
    print(f"encoded {len(arrays)} image(s) -> {args.out}: {list(bits.shape)} (N x h x w x bits)")
    return 0


def _decode(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from bdt import output_dirs, storage
    from bdt.commands.model import check_new_output
    from bdt.commands.sample import check_seed
    from bdt.data.token_shards import load_npy
    from bdt.tokenizer.io import load_tokenizer

    _check_batch_size(args)
    check_seed(args.seed)
    check_new_output(args)  # before the tokenizer loads
    model = load_tokenizer(args.tokenizer)
    try:  # sizes checked before allocating: np.load took a header's word for terabytes
        bits = load_npy(storage.read_bytes(args.bits))
    except ValueError as exc:
        raise ValueError(f"{args.bits}: not a plain .npy array: {exc}") from None
    if bits.dtype.kind not in "biuf":  # a record, a string
        raise ValueError(f"{args.bits}: expected one .npy array of 0/1 (bool, int or float), got "
                         f"{bits.dtype}")
    if model.config.out_ch not in (1, 3):
        raise ValueError(f"{args.tokenizer}: decodes {model.config.out_ch}-channel images; PNGs "
                         f"are written for 1 (grey) or 3 (RGB)")
    c = model.bits_per_token
    if bits.ndim != 4 or bits.shape[-1] != c:
        raise ValueError(f"{args.bits}: expected N x h x w x {c} bits, got shape {list(bits.shape)}")
    if 0 in bits.shape:
        raise ValueError(f"{args.bits}: holds no token grid (shape {list(bits.shape)})")
    if bits.dtype != bool and not np.isin(bits, (0, 1)).all():
        raise ValueError(f"{args.bits}: values must be 0/1, got {np.unique(bits)[:8].tolist()}")
    generator = torch.Generator().manual_seed(args.seed)
    written = 0
    with output_dirs.staged_dir(args.out, overwrite=args.overwrite) as tmp:
        for start in range(0, len(bits), args.batch_size):
            batch = torch.from_numpy(bits[start:start + args.batch_size].astype(bool))
            images = model.decode(batch, generator=generator).float().clamp(-1, 1)
            pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for arr in pixels:
                image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
                image.save(os.path.join(tmp, f"{written:06d}.png"), format="PNG")
                written += 1
    print(f"decoded {written} image(s) -> {args.out}")
    return 0
