"""Raw image-caption test data: varied valid samples, one sample per bad-input kind, tar helpers."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

MIN_SIDE = 16
MAX_PIXELS = 200_000


def image_bytes(w: int, h: int, mode: str = "RGB", fmt: str = "PNG", seed: int = 0, **save_kw) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def exif_rotated_jpeg(w: int, h: int, seed: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_bytes(w, h, fmt="JPEG", seed=seed, exif=exif.tobytes(), quality=90)


def good_samples(prefix: str, n: int, seed: int) -> list[dict]:
    """Varied aspect ratios and pixel modes, all valid."""
    kinds = [
        ("png", lambda i: image_bytes(48, 32, seed=seed + i)),
        ("png", lambda i: image_bytes(32, 48, seed=seed + i)),
        ("jpg", lambda i: image_bytes(40, 40, fmt="JPEG", seed=seed + i, quality=90)),
        ("png", lambda i: image_bytes(40, 36, mode="L", seed=seed + i)),
        ("png", lambda i: image_bytes(48, 32, mode="RGBA", seed=seed + i)),
        ("jpg", lambda i: image_bytes(40, 40, mode="CMYK", fmt="JPEG", seed=seed + i)),
        ("png", lambda i: image_bytes(36, 40, mode="P", seed=seed + i)),
        ("jpg", lambda i: exif_rotated_jpeg(48, 32, seed + i)),
        ("webp", lambda i: image_bytes(64, 24, fmt="WEBP", seed=seed + i)),
    ]
    out = []
    for i in range(n):
        ext, make = kinds[i % len(kinds)]
        out.append({"__key__": f"{prefix}{i:04d}", ext: make(i), "txt": f"sample {prefix} {i}".encode()})
    return out


# key -> expected reject reason; the samples are built by `bad_samples`.
BAD_REASONS = {
    "bad_corrupt": "corrupt_image", "bad_truncimg": "corrupt_image", "bad_nocap": "missing_caption",
    "bad_emptycap": "empty_caption", "bad_utf8": "caption_not_utf8", "bad_zero": "empty_image",
    "bad_small": "too_small", "bad_huge": "too_large", "bad_ext": "unknown_extension",
    "bad_noimg": "missing_image", "/abs/evil": "unsafe_path", "../up/evil": "unsafe_path",
    "bad_nul": "caption_control_char", "bad_longcap": "caption_too_long",
}
MAX_CAPTION_BYTES = 200  # bad_longcap's caption is longer


def bad_samples() -> list[dict]:
    png = image_bytes(40, 40, seed=99)
    cap = b"a caption"
    return [
        {"__key__": "bad_corrupt", "png": b"\x89PNG not really", "txt": cap},
        {"__key__": "bad_truncimg", "png": png[: len(png) // 2], "txt": cap},
        {"__key__": "bad_nocap", "png": png},
        {"__key__": "bad_emptycap", "png": png, "txt": b"  \n"},
        {"__key__": "bad_utf8", "png": png, "txt": b"caf\xe9 \xff"},
        {"__key__": "bad_zero", "png": b"", "txt": cap},
        {"__key__": "bad_small", "png": image_bytes(MIN_SIDE - 1, 40), "txt": cap},
        {"__key__": "bad_huge", "png": image_bytes(500, 500), "txt": cap},  # 250k px > MAX_PIXELS
        {"__key__": "bad_ext", "bmp": image_bytes(40, 40, fmt="BMP"), "txt": cap},
        {"__key__": "bad_noimg", "txt": cap, "json": b"{}"},
        {"__key__": "/abs/evil", "png": png, "txt": cap},
        {"__key__": "../up/evil", "png": png, "txt": cap},
        {"__key__": "bad_nul", "png": png, "txt": b"a red\x00circle"},
        {"__key__": "bad_longcap", "png": png, "txt": b"a caption " * 30},
    ]


def write_tar(path: str, samples: list[dict]) -> None:
    import webdataset as wds

    with wds.TarWriter(path, encoder=False) as w:
        for s in samples:
            w.write(s)


def truncate(path: str, fraction: float) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))
