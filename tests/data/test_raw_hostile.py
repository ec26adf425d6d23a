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
