"""Image decoding + bucket preprocessing: modes, EXIF orientation, alpha, limits, crop geometry."""

import io

import numpy as np
import pytest
from PIL import Image

from bdt.data import images as im


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _load(data: bytes, min_side: int = 1, max_pixels: int = 10**8, needed=None) -> Image.Image:
    img, size = im.open_image(data, max_pixels=max_pixels, min_side=min_side)
    out = im.decode_rgb(img, size, needed)
    assert out.size == size and out.mode == "RGB"
    return out


def test_modes_become_rgb_and_alpha_goes_on_white():
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    arr = np.asarray(_load(_encode(rgba, "PNG")))
    assert tuple(arr[1, 1]) == (255, 255, 255) and tuple(arr[0, 0]) == (0, 0, 255)

    gray = np.asarray(_load(_encode(Image.new("L", (5, 5), 77), "PNG")))
    assert (gray == 77).all()

    cmyk = np.asarray(_load(_encode(Image.new("CMYK", (5, 5), (0, 255, 255, 0)), "JPEG", quality=100)))
    assert cmyk[..., 0].min() > 200 and cmyk[..., 1:].max() < 60  # cyan-free, magenta+yellow = red

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    pal.info["transparency"] = 1  # index 1 unused: image stays opaque via palette index 0
    assert tuple(np.asarray(_load(_encode(pal, "PNG")))[0, 0]) == (10, 20, 30)

    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert (np.asarray(_load(_encode(deep, "PNG"))) == 255).all()  # 16-bit rescaled, not clipped wrongly

    la = Image.new("LA", (3, 3), (0, 0))  # black, fully transparent -> white
    assert (np.asarray(_load(_encode(la, "PNG"))) == 255).all()

    # a tRNS colour key on an RGB or gray PNG marks transparent pixels too (once came out black)
    for mode, key, fill in (("RGB", (0, 0, 0), (0, 0, 0)), ("L", 0, 0)):
        keyed = Image.new(mode, (4, 4), fill)
        keyed.putpixel((0, 0), (9, 9, 9) if mode == "RGB" else 9)
        arr = np.asarray(_load(_encode(keyed, "PNG", transparency=key)))
        assert tuple(arr[1, 1]) == (255, 255, 255) and tuple(arr[0, 0]) == (9, 9, 9)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = _encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = _load(data)
    assert out.size == (20, 40)
    arr = np.asarray(out).astype(int)
    assert arr[:20].mean() > 200 and arr[20:].mean() < 50  # former left half is now on top


@pytest.mark.parametrize("data,reason", [
    (b"", im.EMPTY),
    (b"not an image at all", im.CORRUPT),
])
def test_unreadable_bytes_are_rejected(data, reason):
    with pytest.raises(im.ImageRejected) as info:
        _load(data)
    assert info.value.reason == reason


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\n"


@pytest.mark.parametrize("fmt", ["EPS", "TIFF", "BMP"])
def test_only_the_formats_asked_for_are_decoded(fmt):
    """Whatever its member name says: an EPS would run Ghostscript on untrusted bytes."""
    data = EPS if fmt == "EPS" else _encode(Image.new("RGB", (8, 8)), fmt)
    with pytest.raises(im.ImageRejected) as info:
        _load(data)
    assert info.value.reason == im.CORRUPT
    assert info.value.detail == "not a readable JPEG / PNG / WEBP image"  # no object address
    if fmt != "EPS":
        im.open_image(data, max_pixels=100, min_side=1, formats=im.formats_for([fmt.lower()]))
    with pytest.raises(ValueError, match="'.nope'"):
        im.formats_for(["png", "nope"])


def test_truncated_image_is_rejected():
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
    with pytest.raises(im.ImageRejected) as info:
        _load(data[: len(data) // 2])
    assert info.value.reason == im.CORRUPT


def test_size_limits():
    data = _encode(Image.new("RGB", (100, 50)), "PNG")
    with pytest.raises(im.ImageRejected) as info:
        _load(data, min_side=64)
    assert info.value.reason == im.TOO_SMALL and "100x50" in info.value.detail
    with pytest.raises(im.ImageRejected) as info:
        _load(data, max_pixels=4999)
    assert info.value.reason == im.TOO_LARGE
    _load(data, min_side=50, max_pixels=5000)  # exactly at the limits is fine


def test_resize_center_crop_geometry():
    # A wide image with a 3-band pattern: the center crop to a square keeps only the middle band.
    arr = np.zeros((60, 180, 3), dtype=np.uint8)
    arr[:, :60] = (255, 0, 0)
    arr[:, 60:120] = (0, 255, 0)
    arr[:, 120:] = (0, 0, 255)
    out = im.resize_center_crop(Image.fromarray(arr), (32, 32))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[:, 4:28, 1].min() > 200 and out[:, 4:28, [0, 2]].max() < 60
    tall = im.resize_center_crop(Image.fromarray(arr), (16, 48))
    assert tall.shape == (48, 16, 3)


def test_an_image_smaller_than_its_bucket_is_upscaled_and_says_so():
    # 40x30 goes down to 24x24, up to 64x64 and to 40x40 (its 30 rows cover 40 only scaled
    # up), and to its own size not at all.
    data = _encode(Image.new("RGB", (40, 30), (200, 10, 10)), "PNG")
    got = im.load_for_buckets(data, [[(24, 24)], [(64, 64)], [(40, 40)], [(40, 30)]],
                              max_pixels=10**6, min_side=1)
    assert [(bucket, up) for bucket, _, up in got] == [((24, 24), False), ((64, 64), True),
                                                       ((40, 40), True), ((40, 30), False)]
    assert got[1][1].shape == (64, 64, 3) and (got[1][1] == (200, 10, 10)).all()


def test_jpeg_draft_decodes_no_smaller_than_needed():
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 255, (800, 1200, 3), dtype=np.uint8))
    data = _encode(big, "JPEG", quality=80)
    img, size = im.open_image(data, max_pixels=10**8, min_side=1)
    needed = im.needed_size(size, [(64, 64), (128, 64)])
    out = im.decode_rgb(img, size, needed)
    assert out.size[0] >= needed[0] and out.size[1] >= needed[1]
    assert out.size[0] < 1200  # the draft actually reduced the decode
    x = im.to_unit_range(im.resize_center_crop(out, (64, 64))[None])
    assert x.shape == (1, 3, 64, 64) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1


def test_a_16_bit_image_is_rescaled_without_float_copies():
    """A 16-bit grey PNG at the pixel limit took 1.5 GB (float64 temporaries) where an RGB one
    takes 0.3, and 5 s: the table rescale holds its 2-byte pixels and the 1-byte result."""
    import tracemalloc

    levels = np.array([[0, 257, 32896], [65535, 128, 65278]], dtype=np.uint16)
    small = _load(_encode(Image.fromarray(levels), "PNG"))
    assert np.asarray(small)[..., 0].tolist() == [[0, 1, 128], [255, 0, 254]]
    img = Image.fromarray(np.full((1000, 1000), 40000, dtype=np.uint16))
    assert img.mode == "I;16"
    tracemalloc.start()
    try:
        out = im._to_rgb(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (np.asarray(out) == 156).all()
    assert peak < 6 * 1000 * 1000, f"{peak} bytes traced for 1 M pixels"
