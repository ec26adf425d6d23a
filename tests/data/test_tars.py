"""bdt's one tar reader and writer (bdt/data/tars.py, shard_writer.py): members as the standard
tarfile reader sees them in every format it writes, webdataset's sample grouping, the safety
rule, compressed archives, damage, and the writer's atomic, hashed, reproducible output."""

import bz2
import gzip
import hashlib
import io
import lzma
import os
import signal
import tarfile

import pytest
import webdataset as wds

from bdt.data.shard_writer import ShardWriter
from bdt.data.tar_headers import MAX_HEADER_DATA, iter_members
from bdt.data.tars import (NO_EXTENSION, NOT_A_FILE, REPEATED, SAMPLE_TOO_LARGE, TOO_LARGE,
                           UNSAFE_PATH, TarDamaged, iter_samples, read_samples)

LONG = "d" * 90 + "/" + "n" * 80 + ".bits.npy"  # > 100 chars: prefix, pax path or GNU long name


def tar_bytes(entries, fmt=tarfile.PAX_FORMAT) -> bytes:
    """entries: (name, data) for regular files, (name, None, tarfile type) for others."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data, *kind in entries:
            info = tarfile.TarInfo(name)
            if data is not None:
                info.size, info.mtime = len(data), 1.5  # float mtime: a pax header
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type, info.linkname = kind[0], "/etc/passwd"
                tar.addfile(info)
    return buf.getvalue()


def make_tar(fmt: int) -> bytes:
    return tar_bytes([("a.txt", b"caption"), ("dir", None, tarfile.DIRTYPE),
                      ("a.bits.npy", bytes(range(256)) * 3), (LONG, b"x" * 513), ("b.json", b"")],
                     fmt)


def expected(data: bytes) -> list[tuple[str, bytes, int]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        return [(m.name, tar.extractfile(m).read(), m.offset) for m in tar if m.isfile()]


def members(f, offset=0):
    return [(m.name, m.data, m.offset) for m in iter_members(f, offset)]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_same_members_as_tarfile(fmt):
    data = make_tar(fmt)
    want = expected(data)
    assert [n for n, _, _ in want] == ["a.txt", "a.bits.npy", LONG, "b.json"]
    assert members(io.BytesIO(data)) == want
    # resuming at a member's first header gives the rest, with absolute offsets
    f = io.BytesIO(data)
    f.seek(want[2][2])
    assert members(f, want[2][2]) == want[2:]


def test_samples_grouped_as_webdataset_groups_them(tmp_path):
    path = str(tmp_path / "s.tar")
    with wds.TarWriter(path, encoder=False) as w:
        for i in range(3):
            w.write({"__key__": f"dir/k{i}", "jpg": b"img%d" % i, "txt": b"cap%d" % i,
                     "meta.json": b"{}"})
    ours = [s.as_dict(path) for s in read_samples(path)]
    plain = [{k: v for k, v in s.items() if k != "__local_path__"}
             for s in wds.WebDataset(path, shardshuffle=False)]
    assert ours == plain and [s["__key__"] for s in ours] == ["dir/k0", "dir/k1", "dir/k2"]
    got = list(read_samples(path))
    assert [s.next_offset for s in got] == [got[1].offset, got[2].offset, None]


def test_unsafe_links_oversize_and_extensionless_members_are_not_read():
    data = tar_bytes([("/abs/evil.png", b"x" * 10), ("../up.txt", b"y"), ("ok.png", b"p" * 10),
                      ("ok.txt", b"c" * 100), ("lnk.png", None, tarfile.SYMTYPE), ("noext", b"z"),
                      ("b.PNG", b"q")])
    got = list(iter_samples(io.BytesIO(data), max_bytes=lambda ext: 50 if ext == "txt" else 99))
    assert [(s.key, s.members, [why for _, why, _ in s.refused]) for s in got] == [
        ("/abs/evil", {}, [UNSAFE_PATH]), ("../up", {}, [UNSAFE_PATH]),
        ("ok", {"png": b"p" * 10}, [TOO_LARGE]),
        ("noext", {}, [NO_EXTENSION]),  # a sample of its own, while "lnk" is still being read
        ("lnk", {}, [NOT_A_FILE]), ("b", {"png": b"q"}, [])]  # extensions lowercased
    assert got[2].refused == [("ok.txt", TOO_LARGE, 100)]


def test_compressed_archives_are_read(tmp_path):
    data = make_tar(tarfile.PAX_FORMAT)
    path = tmp_path / "s.tar.gz"
    path.write_bytes(gzip.compress(data))
    assert [s.key for s in read_samples(str(path))] == ["a", LONG.split(".")[0], "b"]


def test_a_sample_over_the_size_limit_keeps_nothing_and_the_next_is_read():
    """Members of many extensions, each under its limit, added up without bound (a MB of gzip
    held 240 MiB in one sample)."""
    data = tar_bytes([("a.png", b"p" * 100)] + [(f"a.x{i}", b"x" * 1000) for i in range(20)]
                     + [("b.png", b"q"), ("b.txt", b"c")])
    got = list(iter_samples(io.BytesIO(data), max_sample_bytes=8000))
    assert [(s.key, s.members, s.refused) for s in got] == [
        ("a", {}, [("a.x4", SAMPLE_TOO_LARGE, 1000)]), ("b", {"png": b"q", "txt": b"c"}, [])]


def test_a_plain_tar_whose_first_name_begins_like_a_magic_is_read(tmp_path):
    """"BZh" opens a bzip2 stream: a tar whose first member is named so is still a tar."""
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes([("BZh91AY&SY.png", b"img"), ("b.png", b"img")],
                               tarfile.USTAR_FORMAT))
    assert [s.key for s in read_samples(str(path))] == ["BZh91AY&SY", "b"]


@pytest.mark.parametrize("suffix,compress", [(".tar.gz", gzip.compress), (".tar.xz", lzma.compress)])
def test_compressed_archives_resume_at_a_samples_offset(tmp_path, suffix, compress):
    """Offsets count decompressed bytes: a resumed reader decompresses its way back to them."""
    path = tmp_path / f"s{suffix}"
    path.write_bytes(compress(make_tar(tarfile.PAX_FORMAT)))
    first, *rest = read_samples(str(path))
    assert [s.key for s in read_samples(str(path), first.next_offset)] == [s.key for s in rest]


COMPRESSORS = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lambda d: lzma.compress(d, preset=0)}
BOMBS = {  # 16 MiB of zeros, a few KB compressed, over the size limit (128 KiB here)
    "one member over the size limit": [("a.png", bytes(16 << 20)), ("b.png", b"img")],
    "many members over it": [(f"k{i:02d}.png", bytes(256 << 10)) for i in range(64)],
}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_a_decompression_bomb_is_damage_read_no_further(tmp_path, monkeypatch, kind, bomb):
    """Before: read (or skipped) by decompressing all of it, 20 GB of zeros included, in every
    rank, every epoch. The floor is 1 MiB here (256 MiB in use)."""
    monkeypatch.setattr("bdt.data.tar_reads.INFLATION_FLOOR", 1 << 20)
    path = tmp_path / "bomb.tar"
    path.write_bytes(COMPRESSORS[kind](tar_bytes(BOMBS[bomb])))
    got = []
    with pytest.raises(TarDamaged, match=rf"^{path}: ReadError: decompression bomb: \d+ bytes "
                                         rf"besides the data read from \d+ compressed "
                                         rf"\(over 100x\)") as e:
        for s in read_samples(str(path), max_bytes=lambda ext: 128 << 10):
            got.append(s.key)
    assert e.value.members <= 6 and len(got) < 6  # stopped past ~1 MiB of the 16
    # Data that compresses as images or token bits do reads whole past the floor.
    random = os.urandom(3 << 20)
    path.write_bytes(COMPRESSORS[kind](tar_bytes([("a.png", random), ("a.txt", bytes(1000))])))
    assert [s.members["png"] for s in read_samples(str(path), max_bytes=lambda ext: 4 << 20)] \
        == [random]
    # Members within the limits read whole whatever their ratio: zeros' is flat BMPs' (image
    # extensions may name BMP, PPM, TIFF); before, the read stopped past the floor as a bomb.
    flat = [(f"k{i:02d}.bmp", bytes(256 << 10)) for i in range(16)]
    path.write_bytes(COMPRESSORS[kind](tar_bytes(flat)))
    assert len(list(read_samples(str(path), max_bytes=lambda ext: 1 << 20))) == 16


def test_a_tar_cut_on_a_block_boundary_is_damage():
    """An interrupted copy often stops at a multiple of 512 bytes: a header boundary, where only
    the missing end-of-archive blocks tell that data is gone."""
    data = make_tar(tarfile.PAX_FORMAT)
    *_, (_, _, last) = expected(data)
    cut = io.BytesIO(data[:last])  # everything before the last member's headers
    got = []
    with pytest.raises(TarDamaged, match="without the end-of-archive blocks") as e:
        for s in iter_samples(cut):
            got.append(s.key)
    assert got == ["a"]  # the long-named sample may have more members: it stays pending
    assert e.value.pending == LONG.split(".")[0]
    assert [s.key for s in iter_samples(io.BytesIO(data))][-1] == "b"  # the whole tar reads


def test_damage_names_the_sample_it_broke_in():
    data = make_tar(tarfile.PAX_FORMAT)
    *_, (_, _, last) = expected(data)
    cut = io.BytesIO(data[:last - 600])  # inside the data of the long-named member
    got = []
    with pytest.raises(TarDamaged, match="unexpected end") as e:
        for s in iter_samples(cut):
            got.append(s.key)
    assert got == ["a"]  # complete before the break: yielded
    assert e.value.pending == LONG.split(".")[0] and e.value.members == 3  # no directory
    assert isinstance(e.value, tarfile.ReadError)
    bad = bytearray(data)
    bad[10] ^= 0xFF  # the first header's name: its checksum no longer matches
    with pytest.raises(TarDamaged, match="checksum") as e:
        next(iter_samples(io.BytesIO(bytes(bad))))
    assert e.value.pending is None and e.value.members == 0


def _with_size_field(data: bytes, field: bytes) -> bytes:
    """`data` with its first header's size field replaced (and its checksum made right again)."""
    header = bytearray(data[:512])
    header[124:136], header[148:156] = field, b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data[512:]


def _pax_then_member(record: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("PaxHeader")
        info.type, info.size = tarfile.XHDTYPE, len(record)
        tar.addfile(info, io.BytesIO(record))
        info = tarfile.TarInfo("a.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cap"))
    return buf.getvalue()


def _raise_timeout(*_):
    raise TimeoutError("the reader did not stop")


def _flipped(data: bytes, start: int, n: int = 40) -> bytes:
    return data[:start] + bytes(b ^ 0x55 for b in data[start:start + n]) + data[start + n:]


PLAIN = tar_bytes([("a.txt", b"caption"), ("b.txt", b"more")])
HOSTILE = {
    "pax length 0": lambda: _pax_then_member(b"0 path=x.txt\n"),
    "pax length < 0": lambda: _pax_then_member(b"-9 path=x.txt\n"),
    "pax size < 0": lambda: _pax_then_member(b"13 size=-999\n"),
    "base-256 size 2**80": lambda: _with_size_field(PLAIN, b"\x80" + (2**80).to_bytes(11, "big")),
    "corrupt xz": lambda: _flipped(lzma.compress(PLAIN), 40),
    "corrupt gzip": lambda: _flipped(gzip.compress(PLAIN), 20),
}


@pytest.mark.parametrize("damage", sorted(HOSTILE))
def test_hostile_headers_and_streams_are_damage(damage, tmp_path):
    """Each of these once hung the reader (a pax record that does not move on), crashed it with
    another error than TarDamaged (OverflowError, LZMAError, zlib.error) or stepped backwards."""
    data = HOSTILE[damage]()
    path = tmp_path / "bad.tar"
    path.write_bytes(data)
    old = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.alarm(10)
    try:
        with pytest.raises(TarDamaged, match=f"^{path}: "):  # naming the file
            list(read_samples(str(path)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_metadata_headers_over_the_cap_are_damage_not_read():
    """pax records were read whole: a few KB of gzip could claim GBs of memory."""
    value = b"x" * MAX_HEADER_DATA
    body = b" comment=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    record = str(length + (len(str(length)) > len(str(len(body))))).encode() + body
    with pytest.raises(TarDamaged, match=f"claims {len(record)} bytes"):
        list(iter_samples(io.BytesIO(_pax_then_member(record))))
    fits = b"20 comment=xxxxxxxx\n"
    assert [s.key for s in iter_samples(io.BytesIO(_pax_then_member(fits)))] == ["a"]


def test_a_repeated_member_is_refused_not_overwritten():
    data = tar_bytes([("a.png", b"first"), ("a.png", b"second"), ("a.txt", b"cap")])
    (got,) = iter_samples(io.BytesIO(data))
    assert got.members == {"png": b"first", "txt": b"cap"} and got.refused == [("a.png", REPEATED, 6)]


def test_shard_writer_is_atomic_hashed_and_reproducible(tmp_path):
    samples = [{"__key__": f"k{i}", "txt": b"cap", "bin": bytes([i]) * 9} for i in range(3)]
    digests = []
    for name in ("a.tar", "b.tar"):
        with ShardWriter(str(tmp_path / name)) as w:
            for s in samples:
                w.write(s)
        data = (tmp_path / name).read_bytes()
        assert w.count == 3 and w.size == len(data)
        assert w.sha256 == hashlib.sha256(data).hexdigest()
        digests.append(w.sha256)
    assert digests[0] == digests[1]  # same samples, same bytes
    assert [s.as_dict() | {"__url__": ""} for s in read_samples(str(tmp_path / "a.tar"))] == \
        [s | {"__url__": ""} for s in samples]
    with pytest.raises(RuntimeError), ShardWriter(str(tmp_path / "c.tar")) as w:
        w.write(samples[0])
        raise RuntimeError("killed mid-shard")
    assert sorted(os.listdir(tmp_path)) == ["a.tar", "b.tar"]  # nothing partial left


@pytest.mark.slow
def test_spools_of_killed_remote_writers_are_deleted_by_the_next_one(tmp_path, monkeypatch):
    """A remote shard is spooled in the temp folder; a writer killed by SIGKILL left its spool
    there for good. The next process's first spool deletes those of dead writers only."""
    import subprocess
    import sys
    import tempfile

    import fsspec

    from bdt.data import shard_writer

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from bdt.data.shard_writer import ShardWriter\n"
        "with ShardWriter('memory://bdt-spool-test/killed.tar') as w:\n"
        "    w.write({'__key__': 'k', 'bin': b'x' * 4096}); print('spooled', flush=True)\n"
        "    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "spooled\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    dead = os.listdir(tmp_path)
    assert len(dead) == 1 and dead[0].startswith(f"bdt-shard-{writer.pid}-")
    others = ["bdt-shard-1-2-0123abcd-abc.part", "bdt-shard-unrelated.part", "notes.txt"]
    for name in others:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(shard_writer, "_swept_spools", False)
    with ShardWriter("memory://bdt-spool-test/next.tar") as w:
        w.write({"__key__": "k", "bin": b"y"})
        live = sorted(set(os.listdir(tmp_path)) - set(others))  # its own spool, being written
        assert len(live) == 1 and live[0].startswith(f"bdt-shard-{os.getpid()}-")
    assert sorted(os.listdir(tmp_path)) == sorted(others)
    assert [s.members for s in read_samples("memory://bdt-spool-test/next.tar")] == [{"bin": b"y"}]
    fsspec.filesystem("memory").rm("/bdt-spool-test", recursive=True)
