"""Regular-file members of a tar stream with their byte offsets, read fast.

The token stream reads every sample of a shard (three small members each, every one behind its
own pax header). The standard `tarfile` reader costs ~200-370 us per sample there, most of the
producer's time at 64 px (profiled: the 16k-token row of ~190 samples took ~110 ms, ~70 ms of
it in tarfile's header parsing), and the stream needs 2,500 samples/s per rank. This reader does
only what the stream needs, in a few bytes operations per header: POSIX ustar names with
prefix, pax `path`/`size` records, GNU long names; other member types (directories, links,
global headers) are stepped over. A bad checksum, a size field it cannot read or data ending
inside a member raise `tarfile.ReadError`, as tarfile does, so callers handle one error type.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # regular, old-style regular, contiguous
_CHECKSUM_SPACES = 8 * ord(" ")  # the checksum field counts as spaces


def _octal(field: bytes, what: str, offset: int) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes >= 8 GiB)
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise tarfile.ReadError(f"bad {what} field {field!r} in the header at byte {offset}") \
            from None


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """'LEN key=value\\n' records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        end = pos + int(data[pos:space])
        key, _, value = data[space + 1:end - 1].partition(b"=")
        out[key] = value
        pos = end
    return out


def _read(f: BinaryIO, n: int, offset: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise tarfile.ReadError(f"unexpected end of data at byte {offset + len(data)}")
    return data


def iter_members(f: BinaryIO, offset: int = 0) -> Iterator[tuple[str, bytes, int]]:
    """(name, data, byte offset of the member's first header) of each regular file in the tar
    read from `f`, which is positioned at byte `offset` of the archive (a header boundary)."""
    pos, start, long_name, pax = offset, None, None, {}
    while True:
        header = f.read(BLOCK)
        if len(header) < BLOCK or not header.strip(b"\0"):
            if header.strip(b"\0"):
                raise tarfile.ReadError(f"unexpected end of data at byte {pos + len(header)}")
            return  # end-of-archive block (or a tar without one)
        start = pos if start is None else start
        stored = _octal(header[148:156], "checksum", pos)
        if sum(header) - sum(header[148:156]) + _CHECKSUM_SPACES != stored:
            raise tarfile.ReadError(f"bad checksum in the header at byte {pos}")
        size = int(pax[b"size"]) if b"size" in pax else _octal(header[124:136], "size", pos)
        padded = size + -size % BLOCK
        data = _read(f, padded, pos + BLOCK)[:size]
        pos += BLOCK + padded
        kind = header[156:157]
        if kind == b"x":
            pax = _pax_records(data)
            continue
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0]
            continue
        if kind in _FILE_TYPES:
            name = pax.get(b"path") or long_name
            if name is None:
                name = header[:100].split(b"\0", 1)[0]
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix and header[257:265] == b"ustar\x0000":  # POSIX, not GNU, layout
                    name = prefix + b"/" + name
            yield name.decode("utf-8", "surrogateescape"), data, start
        start, long_name, pax = None, None, {}
