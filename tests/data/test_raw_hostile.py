"""The tokenizer trainer's raw reader on hostile shards: bad samples are skipped and counted, the
others are all read, nothing oversized is read into memory."""

from __future__ import annotations

import io
import itertools

import numpy as np
import webdataset as wds
from PIL import Image

from bdt.data import raw
from bdt.data.raw import RawImageStream


def _png(seed: int, w: int = 24, h: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _shard(path: str, samples: list[dict]) -> str:
    with wds.TarWriter(path, encoder=False) as w:
        for s in samples:
            w.write(s)
    return path


def test_a_member_over_the_limit_is_skipped_unread(tmp_path, monkeypatch):
    big = _png(1, 200, 200)
    small = [_png(i) for i in range(3)]
    monkeypatch.setattr(raw, "MAX_MEMBER_BYTES", (len(big) + max(map(len, small))) // 2, raising=False)
    url = _shard(str(tmp_path / "s.tar"), [
        {"__key__": "a", "png": small[0], "txt": b"a"},
        {"__key__": "big", "png": big, "txt": b"big"},
        {"__key__": "b", "png": small[1], "txt": b"b"},
        {"__key__": "c", "png": small[2], "txt": b"c"},
    ])
    batches = list(itertools.islice(iter(RawImageStream([url], 16, 3, 0, 1)), 1))
    assert batches[0]["keys"] == ["a", "b", "c"] and batches[0]["corrupt"] == 1


def test_png_with_a_damaged_stream_is_skipped_not_trained_on(tmp_path):
    """A PNG whose chunks are intact but whose zlib data is damaged must not reach the batch
    half-decoded."""
    import struct
    import zlib

    data = _png(5, 64, 64)
    at = data.find(b"IDAT")
    n = struct.unpack(">I", data[at - 4:at])[0]
    idat = data[at + 4:at + 14] + b"\xff" * 8 + data[at + 22:at + 4 + n]
    broken = (data[:at - 4] + struct.pack(">I", n) + b"IDAT" + idat
              + struct.pack(">I", zlib.crc32(b"IDAT" + idat)) + data[at + 8 + n:])
    url = _shard(str(tmp_path / "s.tar"), [{"__key__": "a", "png": _png(0), "txt": b"a"},
                                           {"__key__": "broken", "png": broken, "txt": b"b"},
                                           {"__key__": "c", "png": _png(2), "txt": b"c"}])
    batch = next(iter(RawImageStream([url], 16, 2, 0, 1)))
    assert batch["keys"] == ["a", "c"] and batch["corrupt"] == 1


def _tar_with_refused(path: str, good: list[bytes], big: bytes) -> str:
    """good[0], an oversized image alone, a '..' member, a symlink, then the rest of `good`."""
    import tarfile

    def add(t, name, data=b"", kind=tarfile.REGTYPE):
        info = tarfile.TarInfo(name)
        info.type, info.size, info.linkname = kind, len(data), "a.png" if kind != tarfile.REGTYPE else ""
        t.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(path, "w") as t:
        add(t, "a.png", good[0])
        add(t, "big.png", big)
        add(t, "../up.png", good[0])
        add(t, "link.png", kind=tarfile.SYMTYPE)
        for i, data in enumerate(good[1:]):
            add(t, f"g{i}.png", data)
    return path


def test_a_sample_with_nothing_readable_is_counted_once(tmp_path, monkeypatch):
    """An image alone over the size limit, a '..' path, a link: skipped and counted (they were
    dropped uncounted), and not counted again by a stream resumed past them."""
    good, big = [_png(i) for i in range(4)], _png(9, 200, 200)
    monkeypatch.setattr(raw, "MAX_MEMBER_BYTES", (len(big) + max(map(len, good))) // 2, raising=False)
    url = _tar_with_refused(str(tmp_path / "s.tar"), good, big)
    first, second = itertools.islice(iter(RawImageStream([url], 16, 2, 0, 1)), 2)
    assert first["keys"] == ["a", "g0"] and first["corrupt"] == 3
    assert second["keys"] == ["g1", "g2"] and second["corrupt"] == 3
    resumed = next(iter(RawImageStream([url], 16, 2, 0, 1, positions={0: first["position"]})))
    assert resumed["keys"] == ["g1", "g2"] and resumed["corrupt"] == 3


def test_a_read_failing_past_samples_of_nothing_readable_counts_them_once(tmp_path,
                                                                          monkeypatch):
    """A failed read is tried again from the sample after the last one read: it meets the samples
    of nothing readable behind that one again, which were counted (and logged) a second time."""
    from bdt.data import tar_reads

    from testkit import pauses_that

    good, big = [_png(i) for i in range(4)], _png(9, 200, 200)
    monkeypatch.setattr(raw, "MAX_MEMBER_BYTES", (len(big) + max(map(len, good))) // 2, raising=False)
    url = _tar_with_refused(str(tmp_path / "s.tar"), good, big)
    real, failed = raw.read_samples, []

    def failing_once_after_the_link(url, **kwargs):
        for sample in real(url, **kwargs):
            yield sample
            if sample.key == "link" and not failed:
                failed.append(sample.key)
                raise tar_reads.ReadFailed("OSError: [Errno 5] I/O error")
    monkeypatch.setattr(raw, "read_samples", failing_once_after_the_link)
    pauses_that(monkeypatch)
    first, second = itertools.islice(iter(RawImageStream([url], 16, 2, 0, 1)), 2)
    assert failed and first["keys"] == ["a", "g0"] and second["keys"] == ["g1", "g2"]
    assert first["corrupt"] == second["corrupt"] == 3


def test_a_skipped_samples_key_is_logged_on_one_line(tmp_path, caplog):
    """Keys are member names, which may hold line breaks and terminal escapes: logged as they
    were, they forged log lines (and recoloured terminals)."""
    import tarfile

    key = "a\nWARNING forged line \x1b[2J"
    path = str(tmp_path / "s.tar")
    with tarfile.open(path, "w") as t:
        for name, data, kind in (("ok.png", _png(0), tarfile.REGTYPE),
                                 (key + ".png", b"not an image", tarfile.REGTYPE),
                                 (key + "2.png", b"", tarfile.SYMTYPE),
                                 ("ok2.png", _png(1), tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            t.addfile(info, io.BytesIO(data))
    with caplog.at_level("WARNING", logger="bdt.data.raw"):
        batch = next(iter(RawImageStream([path], 16, 2, 0, 1)))
    assert batch["keys"] == ["ok", "ok2"] and batch["corrupt"] == 2
    skips = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
    assert len(skips) == 2, skips
    assert all("\n" not in m and "\x1b" not in m and repr(key)[:-1] in m for m in skips), skips
