"""Hostile raw inputs through an extraction actor's `process` (no Ray): every bad sample becomes
one reject with its reason, the good samples of its shard are all written, and a rerun gives
the same bytes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pytest
from extract_rawdata import exif_rotated_jpeg, image_bytes, write_tar
from testkit import pauses_that

from bdt.extract import input_reading, input_units
from bdt.extract import manifest as mf
from bdt.extract.worker import ShardEncoder

EXTS = ["jpg", "jpeg", "png", "webp"]
GOOD, CAP = image_bytes(32, 32, seed=1), b"a caption"


def _animated(fmt: str) -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _png_with_broken_stream() -> bytes:
    """Valid chunks and CRCs around a damaged zlib stream (PIL's getexif decodes a PNG)."""
    import struct
    import zlib

    data = image_bytes(64, 64)
    at = data.find(b"IDAT")
    n = struct.unpack(">I", data[at - 4:at])[0]
    idat = data[at + 4:at + 14] + b"\xff" * 8 + data[at + 22:at + 4 + n]
    return data[:at - 4] + struct.pack(">I", n) + b"IDAT" + idat + \
        struct.pack(">I", zlib.crc32(b"IDAT" + idat)) + data[at + 8 + n:]


# key -> (members besides the key, reject reason or "" when the sample must be written)
SAMPLES = {
    "zero": ({"jpg": b"", "txt": CAP}, "empty_image"),
    "trunc_jpeg": ({"jpg": image_bytes(64, 64, fmt="JPEG")[:300], "txt": CAP}, "corrupt_image"),
    "trunc_png": ({"png": image_bytes(64, 64)[:200], "txt": CAP}, "corrupt_image"),
    "png_broken_zlib": ({"png": _png_with_broken_stream(), "txt": CAP}, "corrupt_image"),
    "png_named_jpg": ({"jpg": GOOD, "txt": CAP}, ""),  # the content decides among allowed formats
    "text_named_jpg": ({"jpg": b"hello, not an image", "txt": CAP}, "corrupt_image"),
    "one_px": ({"png": image_bytes(1, 1), "txt": CAP}, "too_small"),
    "wide": ({"png": image_bytes(2000, 10), "txt": CAP}, ""),  # min_side 8: kept, cropped
    "cmyk": ({"jpg": image_bytes(32, 32, mode="CMYK", fmt="JPEG"), "txt": CAP}, ""),
    "gray": ({"png": image_bytes(32, 32, mode="L"), "txt": CAP}, ""),
    "la": ({"png": image_bytes(32, 32, mode="LA"), "txt": CAP}, ""),
    "exif": ({"jpg": exif_rotated_jpeg(48, 32, 1), "txt": CAP}, ""),
    "anim_webp": ({"webp": _animated("WEBP"), "txt": CAP}, ""),  # first frame
    "gif": ({"gif": _animated("GIF"), "txt": CAP}, "unknown_extension"),
    "two_images": ({"jpg": image_bytes(32, 32, fmt="JPEG"), "png": GOOD, "txt": CAP}, ""),
    "cap_missing": ({"png": GOOD}, "missing_caption"),
    "cap_empty": ({"png": GOOD, "txt": b""}, "empty_caption"),
    "cap_space": ({"png": GOOD, "txt": b" \t\n"}, "empty_caption"),
    "cap_latin1": ({"png": GOOD, "txt": b"caf\xe9"}, "caption_not_utf8"),
    "cap_1mb": ({"png": GOOD, "txt": b"x" * (1 << 20)}, "caption_too_long"),
}


def _member(name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data or b"")
    return info, io.BytesIO(data) if data is not None else None


# Members tarfile writes that webdataset's writer would not: (members, key, reason).
SPECIAL = [
    ([_member("/etc/x.png", GOOD)], "/etc/x", "unsafe_path"),
    ([_member("a/../../x.png", GOOD)], "a/../../x", "unsafe_path"),
    ([_member("s.png", kind=tarfile.SYMTYPE, link="/etc/passwd")], "s", "not_a_file"),
    ([_member("h.png", kind=tarfile.LNKTYPE, link="ok.png")], "h", "not_a_file"),
    ([_member("c.png", kind=tarfile.CHRTYPE)], "c", "not_a_file"),
    ([_member("d.png", kind=tarfile.DIRTYPE)], "d", "missing_image"),  # the .txt stays alone
]


@pytest.fixture
def encoder(tiny_tokenizer, tmp_path):
    cfg = {"inputs": "unused", "output": str(tmp_path / "out"), "tokenizer": tiny_tokenizer,
           "min_side": 8, "max_pixels": 1_000_000, "batch_size": 4, "image_extensions": EXTS}
    return ShardEncoder(cfg, "fp", {"s": [[32, 32], [64, 16], [16, 64]]})


def _extract(encoder, spec: str) -> list[tuple[dict, list[dict], bytes]]:
    """(marker, rejects, shard bytes) per input unit."""
    out = []
    for unit in input_units.list_units(spec, "auto", 1000, EXTS):
        marker = encoder.process(unit.to_dict())["stages"]["s"]
        root = encoder.cfg.output
        rejects_url = mf.rejects_url(root, unit.index)
        rejects = ([json.loads(line) for line in open(rejects_url)] if os.path.exists(rejects_url) else [])
        with open(mf.shard_url(root, "s", unit.index), "rb") as f:
            out.append((marker, rejects, f.read()))
    return out


def test_every_hostile_sample_is_one_reject_and_the_good_ones_are_kept(encoder, tmp_path):
    samples = [{"__key__": "ok_first", "png": GOOD, "txt": CAP}]
    samples += [{"__key__": k, **members} for k, (members, _) in SAMPLES.items()]
    samples += [{"__key__": "ok_last", "png": GOOD, "txt": CAP}]
    path = str(tmp_path / "in.tar")
    write_tar(path, samples)
    (marker, rejects, shard), = _extract(encoder, path)
    got = {r["key"]: r["reason"] for r in rejects}
    assert got == {k: why for k, (_, why) in SAMPLES.items() if why}
    assert all(r["source"] == path and set(r) == {"key", "source", "reason", "detail"} for r in rejects)
    assert marker["inputs"] == len(samples) and marker["samples"] == len(samples) - len(rejects)
    os.remove(mf.marker_url(encoder.cfg.output, "s", 0))
    (_, rejects2, shard2), = _extract(encoder, path)  # redone from scratch: same bytes
    assert shard2 == shard and rejects2 == rejects


@pytest.mark.parametrize("members,key,reason", SPECIAL, ids=[s[2] + ":" + s[1] for s in SPECIAL])
def test_unsafe_and_special_tar_members_are_refused_unread(encoder, tmp_path, members, key, reason):
    path = str(tmp_path / "in.tar")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in [_member("ok.png", GOOD), _member("ok.txt", CAP), *members,
                           _member(key + ".txt", CAP), _member("z.png", GOOD), _member("z.txt", CAP)]:
            tar.addfile(info, data)
    (marker, rejects, _), = _extract(encoder, path)
    assert [(r["key"], r["reason"]) for r in rejects] == [(key, reason)]
    assert (marker["inputs"], marker["samples"]) == (3, 2)


def _tar_of(n: int, tmp_path) -> bytes:
    path = str(tmp_path / "full.tar")
    write_tar(path, [{"__key__": f"k{i}", "png": GOOD, "txt": CAP} for i in range(n)])
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("damage,written,rejected", [
    ("cut mid-member", 1, [("k1", "truncated_tar")]),
    ("garbage after the end blocks", 4, []),
    ("html under a .tar name", 0, [("", "unreadable_shard")]),
    ("zero bytes", 0, [("", "unreadable_shard")]),
])
def test_damaged_tars_keep_what_was_read(encoder, tmp_path, damage, written, rejected):
    full = _tar_of(4, tmp_path)
    data = {"cut mid-member": full[:len(full) // 2 + 100],
            "garbage after the end blocks": full + bytes(range(1, 256)) * 12,
            "html under a .tar name": b"<html>404</html>" * 100, "zero bytes": b""}[damage]
    path = str(tmp_path / "in.tar")
    with open(path, "wb") as f:
        f.write(data)
    (marker, rejects, _), = _extract(encoder, path)
    assert [(r["key"], r["reason"]) for r in rejects] == rejected
    assert marker["samples"] == written


def _with_profile(mode: str, fmt: str, space: bytes) -> bytes:
    """An image embedding the sRGB profile relabelled to the colour space `space`."""
    from PIL import Image, ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    Image.new(mode, (32, 32)).save(buf, fmt, icc_profile=srgb[:16] + space + srgb[20:])
    return buf.getvalue()


def test_images_whose_icc_profile_is_ignored_are_written_and_counted(encoder, tmp_path):
    """A CMYK profile, or one of another colour space than the pixels', is ignored and its image
    written as if sRGB: it was counted nowhere, now per unit in each stage's marker."""
    cmyk = _with_profile("CMYK", "JPEG", b"CMYK")
    members = {"cmyk": {"jpg": cmyk, "txt": CAP},
               "grey_rgb_profile": {"png": _with_profile("L", "PNG", b"RGB "), "txt": CAP},
               "srgb": {"png": _with_profile("RGB", "PNG", b"RGB "), "txt": CAP},  # used: not counted
               "plain": {"png": GOOD, "txt": CAP},
               "cmyk_no_caption": {"jpg": cmyk}}  # rejected: not written, not counted
    path = str(tmp_path / "in.tar")
    write_tar(path, [{"__key__": k, **m} for k, m in members.items()])
    (marker, rejects, _), = _extract(encoder, path)
    assert [r["key"] for r in rejects] == ["cmyk_no_caption"]
    assert (marker["samples"], marker["icc_ignored"]) == (4, 2)


def test_same_key_in_two_tars_is_kept_in_each(encoder, tmp_path):
    for i in range(2):
        write_tar(str(tmp_path / f"s-{i}.tar"), [{"__key__": "a", "png": GOOD, "txt": CAP}])
    results = _extract(encoder, str(tmp_path / "s-{0..1}.tar"))
    assert [(m["samples"], r) for m, r, _ in results] == [(1, []), (1, [])]  # source_shard tells them apart


def test_a_source_key_spelled_like_a_hashed_key_is_kept(encoder, tmp_path):
    """'a_b-<hash of "a b">', 'a_b', 'a b': the third's hashed output key was the first's, and a
    valid sample was rejected as duplicate_key."""
    import hashlib

    from bdt.data.token_shards import iter_token_shard

    hashed = "a_b-" + hashlib.sha256(b"a b").hexdigest()[:8]
    write_tar(str(tmp_path / "k.tar"), [{"__key__": k, "png": GOOD, "txt": CAP} for k in (hashed, "a_b", "a b")])
    (marker, rejects, _), = _extract(encoder, str(tmp_path / "k.tar"))
    assert (marker["samples"], rejects) == (3, [])
    keys = {s.source_key: s.key for s in iter_token_shard(mf.shard_url(encoder.cfg.output, "s", 0))}
    assert keys == {hashed: hashed, "a_b": "a_b", "a b": hashed + "-1"}


def test_a_directory_named_like_an_image_in_a_folder_is_not_a_sample(encoder, tmp_path):
    folder = tmp_path / "folder"
    (folder / "x.jpg").mkdir(parents=True)
    (folder / "ok.png").write_bytes(GOOD)
    (folder / "ok.txt").write_bytes(CAP)
    (marker, rejects, _), = _extract(encoder, str(folder))
    assert (marker["inputs"], marker["samples"], rejects) == (1, 1, [])


def test_a_sample_with_two_images_uses_the_first_of_image_extensions(tmp_path):
    path = str(tmp_path / "in.tar")
    jpeg = image_bytes(32, 32, fmt="JPEG")
    write_tar(path, [{"__key__": "two", "png": GOOD, "jpg": jpeg, "txt": CAP}])
    for exts in (["jpg", "png"], ["png", "jpg"]):
        unit, = input_units.list_units(path, "auto", 1000, exts)
        sample, = input_reading.iter_unit(unit, exts, 1 << 20, max_caption_bytes=1 << 10)
        assert sample.image_ext == exts[0]


def test_a_tar_that_stays_unreadable_fails_its_unit_without_rejects(encoder, tmp_path,
                                                                     monkeypatch):
    """Before: a tar that could not be read (gone, an NFS EIO, an S3 outage) became an
    unreadable_shard reject and its unit was marked done without its samples. Now the unit's
    task raises naming the tar (run.py reports the unit failed) and leaves no marker or rejects,
    so a rerun reads it again."""
    path = str(tmp_path / "in.tar")
    write_tar(path, [{"__key__": "a", "png": GOOD, "txt": CAP}])
    unit, = input_units.list_units(path, "auto", 1000, EXTS)
    os.remove(path)
    pauses = pauses_that(monkeypatch)
    with pytest.raises(OSError, match=f"{path}: reading from byte 0 failed 5 times in a row"):
        encoder.process(unit.to_dict())
    root = encoder.cfg.output
    assert pauses == [1.0, 2.0, 4.0, 8.0]
    assert not os.path.exists(mf.marker_url(root, "s", 0)) and not os.path.exists(mf.rejects_url(root, 0))


def test_a_tar_of_many_empty_captions_is_rejected_in_little_memory(encoder, tmp_path):
    """10,000 captions without an image (each under every limit) between two good samples: each
    one missing_image reject, the good ones written. Before, the actor held every reject as an
    object and then their whole file twice (2 million of them: 1.2 GB); now they are spooled to
    disk as they come, and what the unit holds per sample is its key (duplicate_key)."""
    import tracemalloc

    n = 10_000
    path = str(tmp_path / "in.tar")
    with open(path, "wb") as f:  # raw headers: tarfile takes seconds for 10k members
        for name, data in [("a.png", GOOD), ("a.txt", CAP),
                           *((f"c{i:05d}.txt", b"") for i in range(n)), ("z.png", GOOD), ("z.txt", CAP)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            f.write(info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)
    unit, = input_units.list_units(path, "auto", 1000, EXTS)
    tracemalloc.start()
    try:
        marker = encoder.process(unit.to_dict())["stages"]["s"]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (marker["inputs"], marker["samples"], marker["rejected"]) == (n + 2, 2, n)
    with open(mf.rejects_url(encoder.cfg.output, 0), "rb") as f:
        rejects = f.read()
    assert marker["rejects_sha256"] == hashlib.sha256(rejects).hexdigest()
    lines = [json.loads(line) for line in rejects.splitlines()]
    assert [r["key"] for r in lines] == [f"c{i:05d}" for i in range(n)]
    assert {r["reason"] for r in lines} == {"missing_image"}
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB at peak for {n} rejects"  # 6.3 before, 2.6 now
