"""Extracted bits decode back, through a trained tokenizer, to images close to the inputs.

A tiny tokenizer (2x down, 16 bits/token) is overfitted in a plain loop on the crops the
pipeline should produce, computed here WITHOUT bdt's preprocessing (PIL: EXIF transpose, alpha
on white, ImageOps.fit to a bucket chosen by hand). The pipeline then extracts the raw images;
each stored grid, decoded, must match its expected crop clearly better than what a
preprocessing or format bug gives: the same bits at shuffled token positions (a transposed or
mis-ordered grid), with the bit order reversed (MSB/LSB packing), or the crop's mean colour.
A wrong crop, resize or normalisation makes the encoder see pixels it was not fitted on, and
the decode no longer matches the expected crop.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

from bdt.config import load
from bdt.data.token_shards import iter_token_shard
from bdt.extract.config import ExtractConfig
from bdt.extract.run import run
from bdt.tokenizer import BinaryAutoencoder, TokenizerConfig, save_tokenizer, unpack_bits
from bdt.tokenizer.image_metrics import psnr

pytestmark = pytest.mark.slow

BUCKETS = [(32, 32), (48, 24), (24, 48)]
STEPS = 300


def _picture(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A horizontal gradient with three filled shapes: structure everywhere, no symmetry."""
    rng = np.random.default_rng(seed)
    c0, c1 = rng.integers(30, 225, 3), rng.integers(30, 225, 3)
    ramp = (np.arange(w) / w)[None, :, None]
    img = Image.fromarray(np.broadcast_to(c0 + (c1 - c0) * ramp, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        box = [x0, y0, x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    if mode == "RGBA":  # a transparent left third: composited on white
        alpha = np.full((h, w), 255, np.uint8)
        alpha[:, : w // 3] = 0
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(alpha))
    return img.convert(mode) if mode != "RGBA" else img


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _raw_inputs() -> list[tuple[str, bytes, str, tuple[int, int]]]:
    """(key, file bytes, extension, the bucket it must land in)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x64, shown rotated: 64x40 -> the wide bucket
    return [
        ("wide", _encode(_picture(60, 40, 1), "PNG"), "png", (48, 24)),
        ("tall", _encode(_picture(40, 60, 2), "PNG"), "png", (24, 48)),
        ("rotated", _encode(_picture(40, 64, 3), "JPEG", quality=95, exif=exif.tobytes()), "jpg", (48, 24)),
        ("gray", _encode(_picture(44, 44, 4, "L"), "PNG"), "png", (32, 32)),
        ("alpha", _encode(_picture(48, 48, 5, "RGBA"), "PNG"), "png", (32, 32)),
        ("palette", _encode(_picture(64, 32, 6, "P"), "PNG"), "png", (48, 24)),
    ]


def _expected_crop(data: bytes, bucket: tuple[int, int]) -> np.ndarray:
    """The independent reference: uint8 [H, W, 3]."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    rgba = img.convert("RGBA")
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return np.asarray(ImageOps.fit(rgb, bucket, method=Image.Resampling.BICUBIC))


def _to_model(pixels_HWC: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels_HWC.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def _overfit_tokenizer(crops: list[np.ndarray]) -> BinaryAutoencoder:
    """A plain Adam loop, one bucket shape per step, until the crops reconstruct well."""
    torch.manual_seed(0)
    model = BinaryAutoencoder(TokenizerConfig(ch=16, ch_mult=[1, 1], num_res_blocks=1, z_channels=16,
                                              norm_groups=4, sample_entropy_weight=0.0,
                                              codebook_entropy_weight=0.0))
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for c in crops:
        by_shape.setdefault(c.shape, []).append(_to_model(c))
    batches = [torch.cat(v) for _, v in sorted(by_shape.items())]
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: a second thread costs more than it gives
    try:
        for step in range(STEPS):
            x = batches[step % len(batches)]
            recon, quant = model(x)
            loss = F.mse_loss(recon, x) + quant.loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, ray_local):
    import webdataset as wds

    root = tmp_path_factory.mktemp("decode")
    inputs = _raw_inputs()
    with wds.TarWriter(str(root / "in.tar"), encoder=False) as sink:
        for key, data, ext, _ in inputs:
            sink.write({"__key__": key, ext: data, "txt": f"picture {key}".encode()})
    expected = {key: (_expected_crop(data, bucket), bucket) for key, data, _, bucket in inputs}
    model = _overfit_tokenizer([crop for crop, _ in expected.values()])
    save_tokenizer(model, str(root / "tokenizer"))
    buckets = "[" + ", ".join(f"[{w}, {h}]" for w, h in BUCKETS) + "]"
    cfg = load(ExtractConfig, [], [f"inputs={root / 'in.tar'}", f"output={root / 'out'}",
                                   f"tokenizer={root / 'tokenizer'}", f"stages=[{{resolution: 32, buckets: {buckets}}}]",
                                   "min_side=16", "num_actors=1", "batch_size=4"])
    summary = run(cfg)
    assert summary["stages"]["32"]["samples"] == len(inputs) and not summary["failed_units"]
    samples = list(iter_token_shard(os.path.join(str(root / "out"), "32", "000000.tar")))
    return model, expected, samples


def test_bits_decode_to_images_close_to_the_inputs(extracted):
    model, expected, samples = extracted
    assert sorted(s.key for s in samples) == sorted(expected)
    gen = torch.Generator().manual_seed(0)
    for s in samples:
        crop, bucket = expected[s.key]
        assert s.bucket == bucket and s.grid == (bucket[1] // 2, bucket[0] // 2), s.key
        target = _to_model(crop)
        bits_hwC = torch.from_numpy(unpack_bits(s.bits_hwB, 16).astype(bool))[None]
        h, w = s.grid
        shuffled = bits_hwC.reshape(1, h * w, 16)[:, torch.randperm(h * w, generator=gen)].reshape(bits_hwC.shape)
        with torch.no_grad():
            score = {name: float(psnr(model.decode(b).clamp(-1, 1), target)) for name, b in
                     [("stored", bits_hwC), ("shuffled", shuffled), ("bit_order", bits_hwC.flip(-1))]}
        score["mean_colour"] = float(psnr(target.mean((2, 3), keepdim=True).expand_as(target), target))
        best_wrong = max(v for k, v in score.items() if k != "stored")
        assert score["stored"] > 22 and score["stored"] > best_wrong + 6, (s.key, score)
