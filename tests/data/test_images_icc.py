"""Embedded ICC profiles: converted to sRGB, ignored or rejected as bdt.data.images says, checked
against the colour science done here in numpy."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageCms

from bdt.data import images as im


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def _curve(gamma: float) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))


def _profile(space: bytes, description: str, tags: dict[bytes, bytes]) -> bytes:
    """A version 2 display profile (matrix and curves, or a grey curve)."""
    text = description.encode() + b"\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 78
    tags = {b"desc": desc, b"wtpt": _xyz(0.9642, 1.0, 0.8249), **tags}
    table, body, at = b"", b"", 132 + 12 * len(tags)
    for sig, data in tags.items():
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", at + len(body), len(data))
        body += data
    header = (struct.pack(">I", at + len(body)) + b"\0" * 4 + b"\x02\x10\0\0mntr" + space + b"XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 28 + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + body


# Adobe RGB (1998): its primaries adapted to D50 (the columns below), gamma 563/256.
ADOBE_TO_XYZ = np.array([[0.60974, 0.20528, 0.14919], [0.31111, 0.62567, 0.06322],
                         [0.01947, 0.06087, 0.74457]])
ADOBE = _profile(b"RGB ", "Adobe RGB (1998) made by a test", {
    b"rXYZ": _xyz(*ADOBE_TO_XYZ[:, 0]), b"gXYZ": _xyz(*ADOBE_TO_XYZ[:, 1]),
    b"bXYZ": _xyz(*ADOBE_TO_XYZ[:, 2]), **{t: _curve(563 / 256) for t in (b"rTRC", b"gTRC", b"bTRC")}})
LINEAR_GREY = _profile(b"GRAY", "linear grey", {b"kTRC": _curve(1.0)})
XYZ_TO_SRGB = np.array([[3.1338561, -1.6168667, -0.4906146], [-0.9787684, 1.9161415, 0.0334540],
                        [0.0719453, -0.2289914, 1.4052427]])  # D50-adapted linear sRGB


def _srgb_encoded(linear: np.ndarray) -> np.ndarray:
    s = np.clip(linear, 0, 1)
    return np.where(s <= 0.0031308, 12.92 * s, 1.055 * s ** (1 / 2.4) - 0.055) * 255


def _image(colour, mode: str = "RGB", fmt: str = "PNG", icc: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (16, 16), colour).save(buf, fmt, lossless=True,  # (WebP's; PNG ignores it)
                                           **({"icc_profile": icc} if icc else {}))
    return buf.getvalue()


def _decoded(data: bytes) -> np.ndarray:
    (_, pixels, _), = im.load_for_buckets(data, [[(16, 16)]], max_pixels=10**6, min_side=1)
    return pixels[8, 8].astype(int)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_an_adobe_rgb_image_is_converted_to_srgb(fmt):
    colour = (200, 60, 30)
    linear = ADOBE_TO_XYZ @ ((np.array(colour) / 255) ** (563 / 256))
    expected = _srgb_encoded(XYZ_TO_SRGB @ linear)  # about (231, 57, 21)
    got = _decoded(_image(colour, fmt=fmt, icc=ADOBE))
    assert np.abs(got - expected).max() <= 1.5, (got, expected)
    assert tuple(_decoded(_image(colour, fmt=fmt))) == colour


def test_a_grey_profile_is_converted_and_an_srgb_one_kept_as_it_is():
    assert _decoded(_image(128, "L", icc=LINEAR_GREY)).tolist() == \
        [round(_srgb_encoded(np.array(128 / 255)).item())] * 3  # 188: linear 0.5 in sRGB
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert _decoded(_image((200, 60, 30), icc=srgb)).tolist() == [200, 60, 30]


def _ignored(data: bytes) -> bool:
    return im.load_for_buckets(data, [[(16, 16)]], max_pixels=10**6, min_side=1).icc_ignored


def test_a_profile_of_another_colour_space_than_the_pixels_is_ignored():
    assert _decoded(_image(128, "L", icc=ADOBE)).tolist() == [128] * 3
    assert _decoded(_image((200, 60, 30), icc=LINEAR_GREY)).tolist() == [200, 60, 30]


def test_an_ignored_profile_is_said_so_and_a_used_one_is_not():
    """Decoded as sRGB and said nowhere: the extraction could not count them."""
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    ignored = [_image(128, "L", icc=ADOBE), _image((200, 60, 30), icc=LINEAR_GREY),
               _image((200, 60, 30), fmt="JPEG", icc=lab), _image(128, "L", icc=srgb)]
    assert [_ignored(d) for d in ignored] == [True] * 4
    used = [_image((200, 60, 30), icc=ADOBE), _image(128, "L", icc=LINEAR_GREY),
            _image((200, 60, 30), icc=srgb), _image((200, 60, 30))]
    assert [_ignored(d) for d in used] == [False] * 4
    assert [_ignored(d) for d in ignored] == [True] * 4  # cached transforms say the same


@pytest.mark.parametrize("icc,match", [(ADOBE[:100], "unusable"), (b"\0" * 600, "unusable"),
                                       (ADOBE.replace(b"curv", b"junk"), "unusable")],
                         ids=["cut short", "zeros", "unknown curve type"])
def test_a_broken_profile_is_rejected(icc, match):
    with pytest.raises(im.ImageRejected, match=match) as e:
        _decoded(_image((200, 60, 30), fmt="JPEG", icc=icc))
    assert e.value.reason == im.BAD_ICC


def test_a_profile_over_the_size_limit_is_rejected_unparsed(monkeypatch):
    monkeypatch.setattr(im, "MAX_ICC_BYTES", len(ADOBE) - 1)
    with pytest.raises(im.ImageRejected, match=f"profile of {len(ADOBE)} bytes, over") as e:
        _decoded(_image((200, 60, 30), icc=ADOBE))
    assert e.value.reason == im.BAD_ICC
