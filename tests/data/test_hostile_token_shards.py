"""Hostile token shards: every bad sample is refused with a ValueError naming it, and the stream
skips and counts it (never a crash, never wrong bits, grid or metadata trained on), keeps every
good sample and resumes exactly across them; a manifest naming a shard outside its root is
refused at listing."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from bdt.data.shard_source import list_shards
from bdt.data.token_shards import (MAX_CAPTION_BYTES, MAX_METADATA_BYTES, TokenSample,
                                   decode_sample, encode_sample)
from bdt.data.token_stream import TokenStream
from testkit import pauses_that
from trainutil import CAPTIONS, write_shards


def _raw(key="k", h=4, w=4, bits=16, bucket=(64, 64)) -> dict:
    rng = np.random.default_rng(0)
    return encode_sample(TokenSample(
        key=key, bits_hwB=rng.integers(0, 256, (h, w, bits // 8), dtype=np.uint8),
        bits_per_token=bits, bucket=bucket, caption="a red circle", source_key="src",
        source_shard="raw.tar", stage="s"))


def _meta(raw: dict, **fields) -> dict:
    return dict(raw, json=json.dumps(dict(json.loads(raw["json"]), **fields)).encode())


def _npy(shape, dtype="|u1", data: int | None = None) -> bytes:
    """An .npy file with this header and `data` bytes (default: what the header says)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False,
                                               "shape": shape})
    if data is None:
        data = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return buf.getvalue() + b"\x07" * data


def _npy_header(header: str) -> bytes:
    """An .npy file of version 1.0 whose header is this text (and 32 data bytes)."""
    data = header.encode() + b"\n"
    return b"\x93NUMPY\x01\x00" + len(data).to_bytes(2, "little") + data + b"\x07" * 32


_GOOD = _raw()
# (name, raw sample, words of the expected message); each is one hostile sample of a shard.
HOSTILE = [
    ("bits truncated", dict(_GOOD, **{"bits.npy": _GOOD["bits.npy"][:-3]}), "npy data holds"),
    ("bits extra bytes", dict(_GOOD, **{"bits.npy": _GOOD["bits.npy"] + b"\0" * 8}),
     "npy data holds"),
    ("bits of another grid", dict(_GOOD, **{"bits.npy": _npy((2, 8, 2))}), "metadata says"),
    ("bits of another width", dict(_GOOD, **{"bits.npy": _npy((4, 4, 4))}), "metadata says"),
    ("bits uint16", dict(_GOOD, **{"bits.npy": _npy((4, 4, 1), "<u2")}), "metadata says"),
    ("bits negative dims", dict(_GOOD, **{"bits.npy": _npy((-4, 4, 2), data=32)}),
     "npy data holds"),
    ("bits huge header", dict(_GOOD, **{"bits.npy": _npy((2**31, 2**31, 2), data=32)}),
     "npy data holds"),
    ("bits objects", dict(_GOOD, **{"bits.npy": _npy((4, 4, 2), "|O")}), "Python objects"),
    ("bits header cut off", dict(_GOOD, **{"bits.npy": _npy_header(
        "{'descr': '|u1', 'fortran_order': False, 'shape': (4,")}), "TokenError"),
    ("bits header nested past the parser", dict(_GOOD, **{"bits.npy": _npy_header(
        "-" * 9000 + "1")}), "MemoryError"),
    ("bits header keys of two types", dict(_GOOD, **{"bits.npy": _npy_header("{1: 2, 'a': 3}")}),
     "unreadable npy header"),
    ("bits missing", {k: v for k, v in _GOOD.items() if k != "bits.npy"}, "missing member"),
    ("caption missing", {k: v for k, v in _GOOD.items() if k != "txt"}, "missing member"),
    ("caption not UTF-8", dict(_GOOD, txt=b"\xff\xfe caption"), "utf-8"),
    ("caption empty", dict(_GOOD, txt=b" \n\t"), "empty_caption"),
    ("caption invisible", dict(_GOOD, txt="\u200b".encode()), "empty_caption"),
    ("caption with NUL", dict(_GOOD, txt=b"a red\x00circle"), "caption_control_char U+0000"),
    ("schema true", _meta(_GOOD, schema=True), "token-shard schema True"),
    ("grid 0x0", _meta(_GOOD, h=0, w=0), "positive integers"),
    ("grid negative", _meta(_GOOD, h=-4), "positive integers"),
    ("grid NaN", dict(_GOOD, json=_GOOD["json"].replace(b'"h": 4', b'"h": NaN')),
     "positive integers"),
    ("grid float", _meta(_GOOD, w=4.0), "positive integers"),
    ("declared grid not the payload's", _meta(_GOOD, h=2, w=8, bucket=[128, 32]),
     "metadata says"),
    ("bucket not the grid's", _meta(_GOOD, bucket=[128, 32]), "bucket=[128, 32]"),
    ("bucket Infinity", dict(_GOOD, json=_GOOD["json"].replace(b"[64, 64]", b"[Infinity, 64]")),
     "bucket=[inf, 64]"),
    ("bucket string", _meta(_GOOD, bucket="64"), "bucket='64'"),
    ("bucket float", _meta(_GOOD, bucket=[64.5, 64]), "bucket=[64.5, 64]"),
    ("bucket three sides", _meta(_GOOD, bucket=[64, 64, 1]), "bucket=[64, 64, 1]"),
    ("source_key not a string", _meta(_GOOD, source_key=7), "source_key=7"),
    ("stage not a string", _meta(_GOOD, stage=["s"]), "stage=['s']"),
    ("metadata a list", dict(_GOOD, json=b"[1, 2]"), "holds a list"),
    ("metadata nested past the parser", dict(_GOOD, json=b"[" * 100000 + b"]" * 100000),
     "not JSON"),
    ("metadata field missing", dict(_GOOD, json=json.dumps(
        {"schema": 1, "h": 4, "w": 4, "bits_per_token": 16}).encode()), "bad metadata"),
]


@pytest.mark.parametrize("name,raw,problem", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_sample_is_a_value_error_naming_it(name, raw, problem):
    with pytest.raises(ValueError, match=r"^sample k in x\.tar: ") as e:
        decode_sample(dict(raw, __url__="x.tar"))
    assert problem in str(e.value)


def measure(sample):
    """Like CaptionMeasure: refuses a grid the stage cannot pack (odd sides: patch side 2)."""
    h, w = sample.grid
    if h % 2 or w % 2:
        raise ValueError(f"latent grid {h}x{w} is not divisible by the patch side 2")
    return 12 + len(sample.caption.split()) + h * w


def _hostile_shards(tmp_path) -> tuple[list[str], set[str]]:
    """Good shards, one shard of every hostile sample between good ones, an empty shard, a
    shard of another bit width, a 3x4 grid, a 100k-character caption: (urls, good keys)."""
    good = write_shards(str(tmp_path / "good"), [(4, 4), (4, 8)], num_shards=2, per_shard=6)
    mixed = str(tmp_path / "mixed.tar")
    good_keys = {f"s{n:06d}" for n in range(12)}
    with wds.TarWriter(mixed, encoder=False) as sink:
        for i, (_, raw, _) in enumerate(HOSTILE):
            sink.write(dict(raw, __key__=f"bad{i:03d}"))
            sink.write(dict(_raw(), __key__=f"ok{i:03d}"))
            good_keys.add(f"ok{i:03d}")
    wds.TarWriter(str(tmp_path / "empty.tar"), encoder=False).close()
    other = write_shards(str(tmp_path / "b32"), [(4, 4)], num_shards=1, per_shard=3, bits=32)
    odd = write_shards(str(tmp_path / "odd"), [(3, 4)], num_shards=1, per_shard=2)
    long = write_shards(str(tmp_path / "long"), [(4, 4)], num_shards=1, per_shard=1,
                        captions=["word " * 20000])
    return good + [mixed, str(tmp_path / "empty.tar")] + other + odd + long, good_keys


def _stream(urls, budget=200):
    return TokenStream(urls, 0, 1, budget, measure, buffer_size=4, seed=1, bits_per_token=16)


def test_the_stream_skips_and_counts_every_hostile_sample(tmp_path):
    urls, good_keys = _hostile_shards(tmp_path)
    s = _stream(urls)
    got = []
    while s.cursor.epoch == 0:  # one epoch, sample by sample: exact counts
        item = s._read_one()
        got += [item.sample.key] if item is not None else []
    assert sorted(got) == sorted(good_keys)  # every good one once, nothing else
    c = s.counters
    assert (c.corrupt, c.wrong_bits, c.bad_grid, c.oversize) == (len(HOSTILE), 3, 2, 1)


def _members(key: str, raw: dict) -> list[tuple[str | tarfile.TarInfo, bytes | None]]:
    return [(f"{key}.{ext}", data) for ext, data in raw.items() if not ext.startswith("__")]


def _link(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info


# (name, members of sample "bad", words of the logged reason): members the tar reader leaves
# unread, so that the sample is not whole, or is two samples in one.
UNREAD = [
    ("bits twice", _members("bad", _GOOD) + [("bad.bits.npy", _npy((4, 4, 2)))],
     "bad.bits.npy (repeated member"),
    ("caption twice", _members("bad", _GOOD) + [("bad.txt", b"a blue square")],
     "bad.txt (repeated member"),
    ("caption over the limit",
     _members("bad", dict(_GOOD, txt=b"a " * (MAX_CAPTION_BYTES // 2 + 1))),
     f"bad.txt (over the size limit, {MAX_CAPTION_BYTES + 2} bytes)"),
    ("metadata over the limit",
     _members("bad", _meta(_GOOD, source_key="k" * MAX_METADATA_BYTES)), "bad.json (over the"),
    ("caption a link", _members("bad", {k: v for k, v in _GOOD.items() if k != "txt"})
     + [(_link("bad.txt"), None)], "bad.txt (link or device"),
]


@pytest.mark.parametrize("name,members,reason", UNREAD, ids=[u[0] for u in UNREAD])
def test_a_sample_with_a_member_left_unread_is_skipped_naming_it(tmp_path, caplog, name,
                                                                  members, reason):
    """Before: the first of two copies was trained on, a 64 MiB caption was tokenized (~2 min,
    ~5 GB) to learn that it does not fit, a link left 'missing member' as the reason."""
    url = str(tmp_path / "x.tar")
    with tarfile.open(url, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in _members("a", _raw()) + members + _members("c", _raw()):
            info = member if isinstance(member, tarfile.TarInfo) else tarfile.TarInfo(member)
            info.size = 0 if data is None else len(data)
            tar.addfile(info, None if data is None else io.BytesIO(data))
    s = _stream([url])
    got = []
    with caplog.at_level("WARNING", "bdt.data.token_stream"):
        while s.cursor.epoch == 0:
            item = s._read_one()
            got += [item.sample.key] if item is not None else []
    assert got == ["a", "c"] and s.counters.corrupt == 1
    assert f"sample bad in {url}: member(s) not read: {reason}" in caplog.text


def test_resume_is_exact_across_hostile_samples(tmp_path):
    urls, _ = _hostile_shards(tmp_path)
    ref = _stream(urls)
    want = [[x.key for x in ref.next_batch().samples] for _ in range(14)]
    a = _stream(urls)
    for _ in range(6):
        a.next_batch()
    meta, tensors = a.state_dict()
    b = _stream(urls)
    b.load_state_dict(json.loads(json.dumps(meta)), tensors)
    assert [[x.key for x in b.next_batch().samples] for _ in range(8)] == want[6:]
    assert b.counters == ref.counters


def test_the_trainer_rows_skip_a_grid_the_stage_cannot_pack(tmp_path):
    """CaptionMeasure refuses the grid before the packer would raise deep in the worker."""
    from bdt.model.sequence import SequencePacker
    from bdt.model.text_tokenizer import add_special_tokens, make_text_tokenizer, prompt_ids
    from bdt.training.ar.stage_rows import CaptionMeasure, StageData, StageRows

    urls = write_shards(str(tmp_path / "a"), [(4, 4)], num_shards=1, per_shard=6)
    # 3x4: not whole 2x2 patches; 2x10: beyond a position table of 8 per side
    urls += write_shards(str(tmp_path / "odd"), [(3, 4), (4, 6), (2, 10)], num_shards=1,
                         per_shard=6)
    tok = make_text_tokenizer(str(tmp_path / "tok"), CAPTIONS * 20, 384)
    packer = SequencePacker(add_special_tokens(tok, 4), prompt_ids(tok), 4, max_len=160)
    rows = StageRows(urls, 0, 1, 160, 4, 3, 16, CaptionMeasure(tok, packer, max_side=8))
    data = StageData(rows, 0, "thread", torch.device("cpu"))
    try:
        grids = {tuple(g) for _ in range(6) for g in data.next().packed.grid_hw_S2.tolist()}
    finally:
        data.close()
    assert grids == {(4, 4), (4, 6)}
    assert data.counters.bad_grid > 0 and data.counters.bad_grid % 4 == 0  # 4 per epoch


@pytest.mark.parametrize("name", ["s3://other-bucket/f/000000.tar", "file:///tmp/x.tar", ".",
                                  "f/..", "f/../../x.tar", "/abs/f.tar", ""])
def test_a_manifest_naming_a_shard_outside_its_root_is_refused(tmp_path, name):
    write_shards(str(tmp_path / "f"), [(4, 4)], num_shards=1, per_shard=2)
    (tmp_path / "index.json").write_text(json.dumps({"stages": {"f": {"shards": [
        {"shard": "f/000000.tar"}, {"shard": name}]}}}))
    with pytest.raises(ValueError, match=f"lists the shard {name!r}, not a path inside"):
        list_shards(str(tmp_path), "f")


def test_a_listed_shard_cut_inside_a_member_is_read_up_to_the_cut(tmp_path):
    """Its listed size matches (a copy truncated before the manifest was written): the start
    check passes, the stream keeps the samples before the cut, counts the cut and goes on."""
    urls = write_shards(str(tmp_path / "f"), [(4, 4)], num_shards=2, per_shard=6)
    data = open(urls[0], "rb").read()[:9300]  # inside the second sample
    open(urls[0], "wb").write(data)
    (tmp_path / "index.json").write_text(json.dumps({"stages": {"f": {"shards": [
        {"shard": "f/000000.tar", "bytes": len(data)},
        {"shard": "f/000001.tar", "bytes": len(open(urls[1], "rb").read())}]}}}))
    s = _stream(list_shards(str(tmp_path), "f").urls)
    got = set()
    while s.cursor.epoch == 0:
        item = s._read_one()
        got |= {item.sample.key} if item is not None else set()
    assert s.counters.corrupt == 1 and {f"s{n:06d}" for n in range(6, 12)} <= got
    assert 0 < len(got & {f"s{n:06d}" for n in range(6)}) < 6


# (what lies between the samples a and c, or inside c, the sample it is counted as): a link
# of nothing readable; a member without an extension inside c, counted while c is being read
NOTHING_READABLE = [
    ("link", _members("a", _raw()) + [(_link("bad.txt"), None)] + _members("c", _raw()), "bad"),
    ("no_extension", _members("a", _raw()) + _members("c", _raw())[:1] + [("NOTES", b"n" * 600)]
     + _members("c", _raw())[1:], "NOTES"),
]


@pytest.mark.parametrize("members,counted", [case[1:] for case in NOTHING_READABLE],
                         ids=[case[0] for case in NOTHING_READABLE])
def test_a_read_failing_after_a_sample_with_nothing_readable_counts_it_once(tmp_path,
                                                                            monkeypatch,
                                                                            members, counted):
    """A failed read is tried again from the stream's position: past a sample of which nothing
    was readable, else it is read and counted (and logged) twice; a member without an extension
    lies inside the next sample, so the read again meets it, and must not count it again."""
    import bdt.data.tar_reads as tar_reads
    import bdt.data.token_stream as token_stream

    url = str(tmp_path / "x.tar")
    with tarfile.open(url, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            info = member if isinstance(member, tarfile.TarInfo) else tarfile.TarInfo(member)
            info.size = 0 if data is None else len(data)
            tar.addfile(info, None if data is None else io.BytesIO(data))
    real, failed = token_stream.read_token_samples, []

    def failing_once_after_it(url, offset=0):
        for sample in real(url, offset):
            yield sample
            if sample.key == counted and not failed:
                failed.append(offset)
                raise tar_reads.ReadFailed("OSError: [Errno 5] I/O error")
    monkeypatch.setattr(token_stream, "read_token_samples", failing_once_after_it)
    pauses_that(monkeypatch)
    s = _stream([url])
    got = []
    while s.cursor.epoch == 0:
        item = s._read_one()
        got += [item.sample.key] if item is not None else []
    assert failed and got == ["a", "c"] and s.counters.corrupt == 1
