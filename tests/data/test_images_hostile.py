"""Hostile image bytes: each is rejected with its reason before any large allocation, or decoded."""

from __future__ import annotations

import io
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from bdt.data import images as im


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(w: int = 64, h: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def png_with_broken_stream() -> bytes:
    """Valid chunks and CRCs, but the zlib stream inside IDAT is damaged."""
    data = _png()
    at = data.find(b"IDAT")
    n = struct.unpack(">I", data[at - 4:at])[0]
    idat = bytearray(data[at + 4:at + 4 + n])
    idat[10:18] = b"\xff" * 8
    return data[:at - 4] + _chunk(b"IDAT", bytes(idat)) + data[at + 8 + n:]


def jpeg_claiming(w: int, h: int) -> bytes:
    """A small JPEG whose frame header claims w x h (nothing is decoded to learn the size)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


@pytest.mark.parametrize("name,data,max_pixels,reason", [
    ("zlib stream damaged inside valid PNG chunks", png_with_broken_stream(), 10**8, im.CORRUPT),
    ("PNG header claiming 50000x50000", png_header_only(50000, 50000), 10**8, im.TOO_LARGE),
    ("PNG header over max_pixels", png_header_only(5000, 5000), 10**6, im.TOO_LARGE),
    ("PNG under a .jpg name, PNG not allowed", _png(), 10**8, im.CORRUPT),
])
def test_hostile_bytes_are_rejected(name, data, max_pixels, reason):
    formats = ("JPEG",) if "not allowed" in name else im.DEFAULT_FORMATS
    with pytest.raises(im.ImageRejected) as info:
        im.load_for_buckets(data, [[(32, 32)]], max_pixels=max_pixels, min_side=1, formats=formats)
    assert info.value.reason == reason, name


def test_max_pixels_is_the_limit_not_pils_warning_threshold():
    """PIL only warns between Image.MAX_IMAGE_PIXELS and twice that; the configured limit decides
    there (a warnings filter to turn that into an error is process-global, and decode threads
    race on it, so whether an image passed would depend on timing)."""
    w, h = 10000, 9500  # above PIL's warning threshold, below its error threshold
    assert Image.MAX_IMAGE_PIXELS < w * h < 2 * Image.MAX_IMAGE_PIXELS
    with pytest.warns(Image.DecompressionBombWarning):
        _, size = im.open_image(jpeg_claiming(w, h), max_pixels=10**8, min_side=1)
    assert size == (w, h)
    with pytest.warns(Image.DecompressionBombWarning), \
            pytest.raises(im.ImageRejected, match=f"{w}x{h} exceeds max_pixels {w * h - 1}"):
        im.open_image(jpeg_claiming(w, h), max_pixels=w * h - 1, min_side=1)


def jpeg_with_scans_repeated(n: int) -> bytes:
    """A flat progressive JPEG with its smallest scan (31 bytes) repeated n more times: each
    decodes the whole image again (2,000 of them at 4000x4000 px: 156 KB, 36 s)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    starts = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xda"] + [len(data) - 2]
    smallest = min((data[a:b] for a, b in zip(starts, starts[1:])), key=len)
    return data[:-2] + smallest * n + data[-2:]


def test_a_jpeg_of_too_many_scans_is_rejected_before_decoding():
    with pytest.raises(im.ImageRejected, match="over 100 JPEG scans") as info:
        im.load_for_buckets(jpeg_with_scans_repeated(200), [[(32, 32)]], max_pixels=10**8, min_side=1)
    assert info.value.reason == im.CORRUPT
    # Scans of an EXIF thumbnail or past the end of the image (a motion photo's video) are not
    # the image's: counted, they would refuse good photos.
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, "JPEG", progressive=True, exif=exif.tobytes())
    for data in (jpeg_with_scans_repeated(80), buf.getvalue() + b"\xff\xda\x00\x02" * 1000):
        im.load_for_buckets(data, [[(32, 32)]], max_pixels=10**8, min_side=1)


def _run_within_lines(limit: int, fn, *args):
    """fn(*args), failed once it has run more than `limit` lines of Python: work counted in steps,
    the same on any machine, where a timer would count the machine's load too."""
    lines = 0

    def trace(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
            assert lines <= limit, f"{fn.__name__} ran over {limit} lines of Python"
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        return fn(*args)
    finally:
        sys.settrace(previous)


def test_a_jpegs_scans_are_counted_past_fill_bytes_in_steps_per_marker():
    """Any marker may follow a run of 0xFF fill bytes: a byte-by-byte walk took 16 s over a 64 MB
    one (a tar member's limit), several times what decoding the file takes. It ran Python lines
    per fill byte; the count runs a few per marker."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 20, 200)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    second = data.find(b"\xff\xda", data.find(b"\xff\xda") + 2)  # the fill before a later scan
    padded = data[:second] + b"\xff" * (1 << 20) + data[second:]
    assert im._jpeg_scans(data, 100) == data.count(b"\xff\xda")
    assert _run_within_lines(2000, im._jpeg_scans, padded, 100) == data.count(b"\xff\xda")


def _png_with_chunk(kind: bytes, data: bytes) -> bytes:
    png = _png(16, 16)
    return png[:33] + _chunk(kind, data) + png[33:]  # right after IHDR


@pytest.mark.parametrize("kind,head", [(b"zTXt", b"Comment\0\0"), (b"iTXt", b"Comment\0\1\0\0\0"),
                                       (b"iCCP", b"icc\0\0")])
def test_png_metadata_over_pils_limit_is_rejected_as_metadata(kind, head):
    """A 2 KB chunk inflating to 2 MiB, over PIL's 1 MiB for one text or ICC chunk: rejected
    saying what it is (PIL's own message names a "text chunk", an ICC profile's too)."""
    with pytest.raises(im.ImageRejected, match="PNG metadata too large") as e:
        im.load_for_buckets(_png_with_chunk(kind, head + zlib.compress(b"a" * (2 << 20))),
                            [[(16, 16)]], max_pixels=10**6, min_side=1)
    assert e.value.reason == im.CORRUPT


def test_png_metadata_within_pils_limit_decodes():
    comment = _png_with_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * (900 << 10)))
    (_, pixels, _), = im.load_for_buckets(comment, [[(16, 16)]], max_pixels=10**6, min_side=1)
    (_, plain, _), = im.load_for_buckets(_png(16, 16), [[(16, 16)]], max_pixels=10**6, min_side=1)
    assert np.array_equal(pixels, plain)
