"""Image bytes -> RGB pixels of a bucket size, for tokenizer input (reusable by any reader).

Every failure is an `ImageRejected` carrying a short machine-readable reason (written to the
rejects file of the pre-extraction job) plus a detail string; callers never see PIL's own
exception zoo. Only the decoders of the image formats asked for run (by default those of the
jpg/jpeg/png/webp extensions): a member's bytes may be anything whatever its name says, and some
of PIL's plugins are no place for untrusted data (EPS runs Ghostscript). Pixel policy: EXIF
orientation applied; grayscale, palette, CMYK and 16-bit images converted to 8-bit RGB;
transparency composited on white (a transparent background is almost always meant as "paper",
and black would invent dark borders the caption doesn't name); an animated image gives its first
frame; an embedded ICC profile of an RGB or grey colour space other than sRGB (Display P3, Adobe
RGB, a camera's) is converted to sRGB, the tokenizer's and every viewer's space (left as it
was, a P3 photo came out dull); one that does not parse, or over MAX_ICC_BYTES, is rejected
(BAD_ICC: the colours are unknown); one of another colour space than the pixels', or CMYK, is
ignored, as browsers do, and said so (Crops.icc_ignored): the pixels are usable, their colours
read as sRGB may be off. Size limits come from the header: `max_pixels` (PIL itself refuses above twice its
Image.MAX_IMAGE_PIXELS, 179 M, whatever max_pixels says) and `min_side`; a JPEG's decoding time,
from its count of scans (MAX_JPEG_SCANS).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from typing import Sequence

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from bdt.data.buckets import nearest_bucket

# Reasons recorded in rejects files.
EMPTY = "empty_image"
CORRUPT = "corrupt_image"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
BAD_ICC = "bad_icc_profile"

# Bump when a change here makes some image bytes decode to other pixels (1: before ICC profiles
# were converted, 2: since): an extraction output or tokenizer run made by another version is
# not resumed, it would mix the two colourings (extract/manifest.py, training/tokenizer/loop.py).
DECODE_VERSION = 2

# Every scan of a JPEG decodes the whole image again, whatever its size in bytes: 2,000 scans
# of 31 bytes each made a 156 KB file take 36 s. Progressive encoders write 6-18 (PIL's,
# libjpeg's default scripts: grey to CMYK); a count far beyond is a crafted file.
MAX_JPEG_SCANS = 100
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # these swap width and height
# A marker: 0xFF and a byte that is none of stuffing (00), TEM (01), a restart (D0-D7) or fill
# (FF). Searched for in C: a byte-by-byte Python walk took 16 s over a 64 MB run of fill bytes.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\x01\xd0-\xd7\xff]")
# 16-bit grey level -> 8-bit, rounded: v * 255 / 65535.
_SIXTEEN_TO_EIGHT = (np.arange(65536) * 255 / 65535 + 0.5).astype(np.uint8)
# Real profiles: 0.5-3 KB for a display's (matrix and curves), up to ~2 MB with a printer's
# lookup tables, whose size a transform's build time grows with. PIL caps a PNG's at 1 MiB.
MAX_ICC_BYTES = 4 << 20
_SRGB = ImageCms.createProfile("sRGB")
# Transforms by (profile sha256, mode), cleared when full: a few profiles (a camera's, P3) make
# most of a dataset's. NOCACHE: one transform is applied by several decode threads at once.
# None: the pixels stay as they are; IGNORED: so do they, but the profile did not describe them.
_IGNORED = "ignored"
_TRANSFORMS: dict[tuple[bytes, str], ImageCms.ImageCmsTransform | str | None] = {}
_MAX_TRANSFORMS = 32
_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L")


def formats_for(extensions: Sequence[str]) -> tuple[str, ...]:
    """PIL's format names for file extensions ("jpg" -> "JPEG"); ValueError naming one it lacks."""
    known = Image.registered_extensions()
    unknown = [e for e in extensions if f".{e.lower()}" not in known]
    if unknown:
        raise ValueError(f"image_extensions: PIL reads no image format named '.{unknown[0]}'")
    return tuple(sorted({known[f".{e.lower()}"] for e in extensions}))


DEFAULT_FORMATS = formats_for(("jpg", "jpeg", "png", "webp"))


class Crops(list):
    """load_for_buckets's (bucket, crop, upscaled) per bucket list, and whether the image's
    embedded ICC profile was ignored (CMYK, or another colour space than its pixels'): counted by
    the extraction, not rejected, as the pixels are usable though their colours may be off."""

    def __init__(self, crops: list[tuple[tuple[int, int], np.ndarray, bool]], icc_ignored: bool):
        super().__init__(crops)
        self.icc_ignored = icc_ignored


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def open_image(data: bytes, *, max_pixels: int, min_side: int,
               formats: Sequence[str] = DEFAULT_FORMATS) -> tuple[Image.Image, tuple[int, int]]:
    """Open as one of `formats` and check size limits from the header before any pixel is
    decoded (a PNG is then decoded here, see below; other formats lazily in decode_rgb).

    Returns the image and its size *after* EXIF orientation. The pixel limit guards against
    decompression bombs: a few KB of PNG can claim 100k x 100k pixels.
    """
    if not data:
        raise ImageRejected(EMPTY, "0 bytes")
    try:
        # Between Image.MAX_IMAGE_PIXELS and twice that PIL only warns; max_pixels below decides.
        # (No catch_warnings to make it an error: the filter is process-global, decode threads race.)
        img = Image.open(io.BytesIO(data), formats=list(formats))
        w, h = img.size
    except Image.DecompressionBombError as exc:
        raise ImageRejected(TOO_LARGE, str(exc).splitlines()[0]) from None
    except UnidentifiedImageError:  # PIL's message names only a BytesIO object
        raise ImageRejected(CORRUPT, f"not a readable {' / '.join(formats)} image") from None
    except Exception as exc:  # PIL raises many types for unreadable headers
        raise _corrupt(exc) from None
    if w * h > max_pixels:
        raise ImageRejected(TOO_LARGE, f"{w}x{h} exceeds max_pixels {max_pixels}")
    if min(w, h) < max(1, min_side):
        raise ImageRejected(TOO_SMALL, f"{w}x{h} is below min_side {min_side}")
    if img.format in ("JPEG", "MPO"):
        scans = _jpeg_scans(data, MAX_JPEG_SCANS)
        if scans > MAX_JPEG_SCANS:
            raise ImageRejected(CORRUPT, f"over {MAX_JPEG_SCANS} JPEG scans (each decodes the "
                                         f"whole image again)")
    if img.format == "PNG":
        # Its getexif() decodes the pixels (an eXIf chunk may follow them); a failed decode would
        # be swallowed below and leave a half-filled image that decode_rgb's load() accepts.
        try:
            img.load()
        except Exception as exc:
            raise _corrupt(exc) from None
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is not worth rejecting the picture for
        orientation = 1
    if orientation in _TRANSPOSED_ORIENTATIONS:
        w, h = h, w
    return img, (w, h)


def _jpeg_scans(data: bytes, limit: int) -> int:
    """Start-of-scan markers of a JPEG's first image, counted up to limit + 1. Segments are stepped
    over by their length (an EXIF thumbnail's scans are not the image's) and counting ends at the
    end-of-image marker (a motion photo's video follows it)."""
    scans, pos = 0, 2
    while scans <= limit:
        found = _JPEG_MARKER.search(data, pos)
        if found is None or data[found.start() + 1] == 0xD9:
            break
        at = found.start()
        scans += data[at + 1] == 0xDA
        pos = at + 2 + int.from_bytes(data[at + 2:at + 4], "big")  # a scan: then its data
    return scans


def cover_scale(size: tuple[int, int], target: tuple[int, int]) -> float:
    """Scale factor making `size` cover `target` (the resize before a center crop)."""
    return max(target[0] / size[0], target[1] / size[1])


def decode_rgb(img: Image.Image, oriented_size: tuple[int, int], needed: tuple[int, int] | None = None) -> Image.Image:
    """Decode pixels to 8-bit RGB with orientation and alpha handled.

    `needed` (oriented W, H): the smallest size the caller will resize from. JPEGs then decode
    at a reduced DCT scale (draft mode) that is still at least that large: much faster for
    big photos going to small buckets, and no loss since we downsample anyway.
    """
    return _decode(img, oriented_size, needed)[0]


def _decode(img: Image.Image, oriented_size: tuple[int, int], needed: tuple[int, int] | None
            ) -> tuple[Image.Image, bool]:
    """decode_rgb's image, and whether an embedded ICC profile was ignored."""
    try:
        if needed is not None and img.format == "JPEG":
            nw, nh = needed
            if oriented_size != img.size:  # draft works in stored (pre-rotation) coordinates
                nw, nh = nh, nw
            img.draft("RGB", (nw, nh))
        img.load()
        rgb = _to_rgb(ImageOps.exif_transpose(img))
    except Exception as exc:  # truncated data, bad huffman tables, ...
        raise _corrupt(exc) from None
    icc = img.info.get("icc_profile")
    return _to_srgb(rgb, icc, img.mode in _GREY_MODES) if icc else (rgb, False)


def _to_srgb(rgb: Image.Image, icc: bytes, grey: bool) -> tuple[Image.Image, bool]:
    """`rgb` (decoded from pixels in the colour space of the profile `icc`) in sRGB, and whether
    the profile was ignored; the module docstring says which profiles are used, ignored or
    rejected."""
    if len(icc) > MAX_ICC_BYTES:
        raise ImageRejected(BAD_ICC, f"embedded ICC profile of {len(icc)} bytes, over "
                                     f"{MAX_ICC_BYTES}")
    key = (hashlib.sha256(icc).digest(), "L" if grey else "RGB")
    try:
        if key not in _TRANSFORMS:
            if len(_TRANSFORMS) >= _MAX_TRANSFORMS:
                _TRANSFORMS.clear()
            _TRANSFORMS[key] = _transform(icc, key[1])
        transform = _TRANSFORMS[key]
        if transform is None or transform is _IGNORED:
            return rgb, transform is _IGNORED
        return ImageCms.applyTransform(rgb.getchannel(0) if grey else rgb, transform), False
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        raise ImageRejected(BAD_ICC, f"embedded ICC profile unusable: "
                                     f"{type(exc).__name__}: {exc}".splitlines()[0][:200]) from None


def _transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | str | None:
    """The transform from the profile `icc` of `mode` pixels to sRGB; None where they are sRGB
    already, _IGNORED for a profile of another colour space. Parsed first: a broken one raises,
    whatever colour space its header claims."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    if profile.profile.xcolor_space.strip() != ("GRAY" if mode == "L" else "RGB"):
        return _IGNORED
    if "sRGB" in ImageCms.getProfileDescription(profile):
        return None
    return ImageCms.buildTransform(profile, _SRGB, mode, "RGB", flags=ImageCms.Flags.NOCACHE)


def _corrupt(exc: Exception) -> ImageRejected:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if "MAX_TEXT_" in text:  # PIL's limits on a PNG's zTXt, iTXt and iCCP chunks, named "text"
        text = f"PNG metadata too large: {text}"
    return ImageRejected(CORRUPT, text[:200])


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L"):
        # PIL's convert clips instead of rescaling. A table, not float math: float64 temporaries
        # took 24 bytes a pixel (1.5 GB for an allowed 64 MP 16-bit PNG), this 4.
        img = Image.fromarray(_SIXTEEN_TO_EIGHT[np.asarray(img)], "L")
    elif img.mode == "I":  # 32-bit grayscale (TIFF): its own maximum is white
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / max(float(arr.max()), 1.0) * 255.0 + 0.5, 0, 255)
                              .astype(np.uint8), "L")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")  # a palette or tRNS colour key: composited as alpha is
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode != "RGB":  # L, 1, CMYK, YCbCr, LAB, HSV, F
        img = img.convert("RGB")
    return img


def resize_center_crop(img: Image.Image, bucket: tuple[int, int]) -> np.ndarray:
    """Resize so the image covers the bucket, center-crop to it; uint8 [H, W, 3].

    The crop box is computed in source pixels and handed to PIL's resize, which resamples
    from exactly that region in one pass (no second interpolation).
    """
    bw, bh = bucket
    w, h = img.size
    scale = cover_scale((w, h), bucket)
    cw, ch = bw / scale, bh / scale  # crop size in source pixels
    left, top = (w - cw) / 2, (h - ch) / 2
    out = img.resize((bw, bh), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch),
                     reducing_gap=None if scale >= 1 else 3.0)
    return np.asarray(out, dtype=np.uint8)


def needed_size(oriented_size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """Smallest oriented source size from which every bucket can still be cut without upsampling."""
    w, h = oriented_size
    s = min(1.0, max(cover_scale((w, h), b) for b in buckets))
    return math.ceil(w * s), math.ceil(h * s)


def to_unit_range(pixels_BHWC: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1], the tokenizer's input convention."""
    x = pixels_BHWC.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def load_for_buckets(data: bytes, bucket_lists: Sequence[Sequence[tuple[int, int]]], *, max_pixels: int,
                     min_side: int, formats: Sequence[str] = DEFAULT_FORMATS) -> Crops:
    """Decode once; per bucket list, the nearest bucket, the uint8 [H, W, 3] crop to it and
    whether the image was upscaled to cover it (bicubic, like every resize here); Crops says
    whether an embedded ICC profile was ignored.

    The decode size depends on all lists together (JPEG draft), so a given list always gets
    the same pixels for the same bytes and lists. Raises ImageRejected.
    """
    img, size = open_image(data, max_pixels=max_pixels, min_side=min_side, formats=formats)
    chosen = [nearest_bucket(size[0], size[1], buckets) for buckets in bucket_lists]
    rgb, icc_ignored = _decode(img, size, needed_size(size, chosen))
    return Crops([(b, resize_center_crop(rgb, b), cover_scale(size, b) > 1) for b in chosen], icc_ignored)
