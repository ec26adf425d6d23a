"""The fast tar member reader against the standard tarfile reader: same files, names, data and
header offsets in every tar format tarfile writes; damaged archives raise tarfile.ReadError."""

import io
import tarfile

import pytest

from bdt.data.tar_members import iter_members

LONG = "d" * 90 + "/" + "n" * 80 + ".bits.npy"  # > 100 chars: prefix, pax path or GNU long name


def make_tar(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        def add(name, data=b"", kind=tarfile.REGTYPE, mtime=0):
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime = kind, len(data), mtime
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("a.txt", b"caption")
        add("dir", kind=tarfile.DIRTYPE)
        add("a.bits.npy", bytes(range(256)) * 3, mtime=1.5)  # float mtime: a pax header
        add(LONG, b"x" * 513)
        add("b.json", b"")
    return buf.getvalue()


def expected(data: bytes) -> list[tuple[str, bytes, int]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        return [(m.name, tar.extractfile(m).read(), m.offset) for m in tar if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_same_members_as_tarfile(fmt):
    data = make_tar(fmt)
    want = expected(data)
    assert [n for n, _, _ in want] == ["a.txt", "a.bits.npy", LONG, "b.json"]
    assert list(iter_members(io.BytesIO(data))) == want
    # resuming at a member's first header gives the rest, with absolute offsets
    f = io.BytesIO(data)
    f.seek(want[2][2])
    assert list(iter_members(f, want[2][2])) == want[2:]


def test_damage_raises_read_error():
    data = make_tar(tarfile.PAX_FORMAT)
    *_, (_, _, last) = expected(data)
    cut = io.BytesIO(data[:last - 600])  # inside the data of the long-named member
    got = []
    with pytest.raises(tarfile.ReadError, match="unexpected end"):
        for name, _, _ in iter_members(cut):
            got.append(name)
    assert got == ["a.txt", "a.bits.npy"]
    bad = bytearray(data)
    bad[10] ^= 0xFF  # the first header's name: its checksum no longer matches
    with pytest.raises(tarfile.ReadError, match="checksum"):
        next(iter_members(io.BytesIO(bytes(bad))))
