"""Webdataset tars: the one reader of bdt (raw image-caption shards and token shards alike; the
one writer is shard_writer.py).

Reading. A sample is a run of consecutive members sharing a key, webdataset's rule: the key is
the member path up to the first dot of its base name, the rest is the extension (lowercased).
Members whose path is absolute or climbs out with `..` are never read (a data file must not
name places outside itself), nor are links, devices and members over the caller's size limit:
they are listed in `TarSample.refused`, for callers that account for every input (extraction)
while the training readers just use what was read. So is a second member of one sample with
the same extension (webdataset stops there; here the first one read stays). A member without an
extension is a sample of its own (key = its path, nothing read). A sample whose members would
hold more than MAX_SAMPLE_BYTES in all keeps none of them (one SAMPLE_TOO_LARGE refusal).

The header reader does only what webdataset tars need, in a few bytes operations per header:
POSIX ustar names with prefix, pax `path`/`size` records, GNU long names; directories and global
headers are stepped over. The token stream reads ~2,500 samples/s per rank, each of three small
members behind its own pax header: the standard `tarfile` reader spent ~200-370 us per sample
there (profiled: 70 ms of a 110 ms row build at 64 px), this one a fraction of that. Every sample
carries the byte offset of its first header, so a resumed stream seeks straight to its next
unread sample. gzip, bz2 and xz archives are read through the matching decompressor; their
offsets count decompressed bytes, so a resume there decompresses its way back (slow, but it
lands on the same sample). A bad checksum, a size field it cannot read (or negative), a bad pax
record, pax or long-name metadata over MAX_HEADER_DATA, data ending inside a member or before the
end-of-archive blocks (every tar writer writes them: a tar without them was cut short, often on
a block boundary by an interrupted copy), a decompressor's error or an archive decompressing to
over MAX_INFLATION times its compressed bytes (a decompression bomb) raise `TarDamaged` (a
`tarfile.ReadError`), naming the sample that was being read. An OSError opening or reading the
file is a `ReadFailed` (inside TarDamaged when it came mid-tar; `read_failure` finds it): the
bytes may read fine again, so the readers try again (`ReadRetries`) instead of skipping them as
damage.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import logging
import lzma
import posixpath
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from bdt import storage

BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # regular, old-style regular, contiguous
_SKIPPED_TYPES = (b"5", b"g")  # directories, pax global headers: nothing of a sample
_CHECKSUM_SPACES = 8 * ord(" ")  # the checksum field counts as spaces
_SKIP_CHUNK = 1 << 20
# What the training readers read of one member at most (the sample is skipped beyond): a hostile
# multi-GB member would otherwise be read whole into a data worker, killing it again after every
# resume. The extraction job's default max_image_bytes; a token sample's bits are KBs.
MAX_MEMBER_BYTES = 64 * 1024 * 1024
# pax records and GNU long names are read whole: without a cap a few KB of gzip could claim GBs.
MAX_HEADER_DATA = 1 << 20
# What one sample holds at most (its members' data and names, a block each): members of many
# extensions, each under its limit, would otherwise add up (a MB of gzip held 240 MiB).
MAX_SAMPLE_BYTES = 4 * MAX_MEMBER_BYTES
# A compressed archive may decompress to at most MAX_INFLATION times the compressed bytes read,
# past its first INFLATION_FLOOR bytes; beyond that it is a decompression bomb, stopped as damage
# (stepping over its members, one over the size limit or many under it, decompressed them all:
# GBs of CPU in every rank, every epoch). Measured (gzip / bz2 / xz): the demo's raw JPEG shards
# 2.4 / 2.5 / 2.5x; token shards of random bits 1.2-3.8x, of bits 90% ones 5.9 / 6.5 / 7.4x; the
# tests' all-zero token shards, a few MB, 170 / 300 / 330x; zeros 1030x in gzip, more in the others.
MAX_INFLATION = 100
INFLATION_FLOOR = 256 << 20
_COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)), (b"BZh", bz2.BZ2File),
               (b"\xfd7zXZ\x00", lzma.LZMAFile))

UNSAFE_PATH = "absolute or '..' path"
NOT_A_FILE = "link or device"
TOO_LARGE = "over the size limit"
NO_EXTENSION = "no extension"
REPEATED = "repeated member"
SAMPLE_TOO_LARGE = "sample over the size limit"
# What a damaged archive raises while read: tar errors, a short file, and the decompressors' own
# errors (zlib's and lzma's are not OSErrors).
_DAMAGE = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError)


class TarDamaged(tarfile.ReadError, ValueError):
    """A tar that breaks off or is damaged (bad data, so also a ValueError). `pending`: the key of
    the sample being read when it broke (None between samples); `members`: how many members were
    read before."""

    def __init__(self, message: str, pending: str | None, members: int):
        super().__init__(message)
        self.pending, self.members = pending, members


@dataclass
class TarSample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension -> data, as read
    refused: list[tuple[str, str, int]] = field(default_factory=list)  # (member, why, size)
    offset: int = 0  # byte offset of the sample's first header (uncompressed tars)
    next_offset: int | None = None  # the next sample's, None at the end

    def as_dict(self, url: str = "") -> dict[str, Any]:
        """The webdataset form: extension -> bytes, plus __key__ and __url__."""
        return {"__key__": self.key, "__url__": url, **self.members}


def readable(name: str) -> str:
    """A member name as valid text: bytes that were not UTF-8 (which the reader keeps as surrogate
    escapes) written as \\xNN, so that UTF-8 and JSON files can hold it."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unsafe_path(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/") or "\\" in name


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) by webdataset's rule, or None for a name without an extension."""
    directory, base = posixpath.split(name)
    dot = base.find(".")
    if dot <= 0:
        return None
    return posixpath.join(directory, base[:dot]), base[dot + 1:].lower()


def log_skip(logger: logging.Logger, count: int, limit: int, message: str, *args: Any,
             counted_in: str = "") -> None:
    """Log the `count`-th skipped sample of a kind while count <= limit, the last one saying that
    further ones are only counted (`counted_in`: where the count shows). A shard of bad samples
    would otherwise flood the log once per sample, again after every resume."""
    if count <= limit:
        tail = f" (further ones are only counted{counted_in})" if count == limit else ""
        logger.warning(message + "%s", *args, tail)


def _octal(raw: bytes, what: str, offset: int) -> int:
    if raw[:1] and raw[0] & 0x80:  # GNU base-256 (sizes >= 8 GiB)
        return int.from_bytes(raw[1:], "big")
    digits = raw.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise tarfile.ReadError(f"bad {what} field {raw!r} in the header at byte {offset}") \
            from None


def _checksum_matches(header: bytes, offset: int) -> bool:
    stored = _octal(header[148:156], "checksum", offset)
    return sum(header) - sum(header[148:156]) + _CHECKSUM_SPACES == stored


def _pax_records(data: bytes, offset: int) -> dict[bytes, bytes]:
    """'LEN key=value\\n' records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        end = pos + int(data[pos:space])
        if not space < end <= len(data):  # a length that does not move on would loop forever
            raise tarfile.ReadError(f"bad pax record length in the header at byte {offset}")
        key, _, value = data[space + 1:end - 1].partition(b"=")
        out[key] = value
        pos = end
    return out


def _chunks(f: BinaryIO, n: int, offset: int) -> Iterator[bytes]:
    """The next n bytes in chunks: a size field claiming more than the archive holds costs no
    more memory than the data that is there (f.read(n) would allocate n bytes first)."""
    done = 0
    while done < n:
        data = f.read(min(n - done, _SKIP_CHUNK))
        if not data:
            raise tarfile.ReadError(f"unexpected end of data at byte {offset + done}")
        done += len(data)
        yield data


def _read(f: BinaryIO, n: int, offset: int) -> bytes:
    return b"".join(_chunks(f, n, offset))  # one chunk: returned as is, no copy


def _skip(f: BinaryIO, n: int, offset: int) -> None:
    """Step over n bytes without holding them (a truncated member still raises)."""
    for _ in _chunks(f, n, offset):
        pass


@dataclass
class Member:
    name: str
    offset: int  # of its first header (pax and GNU long-name headers included)
    size: int
    regular: bool  # a regular file (else a link, device or fifo: never read)
    data: bytes | None  # None when not read


def iter_members(f: BinaryIO, offset: int = 0,
                 limit: Callable[[str, int], bool] | None = None) -> Iterator[Member]:
    """Every member of the tar read from `f` (positioned at byte `offset` of the archive, a
    header boundary) but directories and global headers. A regular file's data is read unless
    its path is unsafe or `limit(name, size)` says no. A ReadError raised inside a member's data
    names that member in its `member` attribute and where its headers start in `member_offset`
    (None when a header broke)."""
    pos, start, long_name, pax = offset, None, None, {}
    while True:
        header = f.read(BLOCK)
        if not header and pos == 0:  # tarfile says so too; a failed download, often
            raise tarfile.ReadError("empty file, not a tar")
        if not header:
            raise tarfile.ReadError(f"the data ends at byte {pos} without the end-of-archive "
                                    f"blocks: the tar was cut short")
        if len(header) < BLOCK or not header.strip(b"\0"):
            if header.strip(b"\0"):
                raise tarfile.ReadError(f"unexpected end of data at byte {pos + len(header)}")
            return  # end-of-archive block
        start = pos if start is None else start
        if not _checksum_matches(header, pos):
            raise tarfile.ReadError(f"bad checksum in the header at byte {pos}")
        size = int(pax[b"size"]) if b"size" in pax else _octal(header[124:136], "size", pos)
        if size < 0:  # a pax record or a base-256 field can say so; it would step backwards
            raise tarfile.ReadError(f"negative size {size} in the header at byte {pos}")
        padded = size + -size % BLOCK
        kind = header[156:157]
        if kind in (b"x", b"L", b"K"):  # metadata of the next header
            if size > MAX_HEADER_DATA:
                raise tarfile.ReadError(f"a metadata header at byte {pos} claims {size} bytes "
                                        f"(at most {MAX_HEADER_DATA} are read)")
            data = _read(f, padded, pos + BLOCK)[:size]
            if kind == b"x":
                pax = _pax_records(data, pos)
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0]
            pos += BLOCK + padded
            continue
        raw = pax.get(b"path") or long_name
        if raw is None:
            raw = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix and header[257:265] == b"ustar\x0000":  # POSIX, not GNU, layout
                raw = prefix + b"/" + raw
        name = raw.decode("utf-8", "surrogateescape")
        regular = kind in _FILE_TYPES and not name.endswith("/")
        skipped = kind in _SKIPPED_TYPES or (kind == b"\0" and name.endswith("/"))
        data = None
        try:
            if regular and not unsafe_path(name) and (limit is None or limit(name, size)):
                data = _read(f, padded, pos + BLOCK)[:size]
            else:
                _skip(f, padded, pos + BLOCK)
        except tarfile.ReadError as e:
            e.member, e.member_offset = (None, None) if skipped else (name, start)
            raise
        pos += BLOCK + padded
        if not skipped:
            yield Member(name, start, size, regular, data)
        start, long_name, pax = None, None, {}


def _held_back(m: Member, ext: str, max_bytes: Callable[[str], int] | None) -> bool:
    """Whether a member was left unread for its sample's size alone."""
    return m.data is None and m.regular and not unsafe_path(m.name) and \
        (max_bytes is None or m.size <= max_bytes(ext))


def _refusal(m: Member) -> str:
    return UNSAFE_PATH if unsafe_path(m.name) else NOT_A_FILE if not m.regular else TOO_LARGE


def iter_samples(f: BinaryIO, offset: int = 0, max_bytes: Callable[[str], int] | None = None,
                 max_sample_bytes: int | None = None) -> Iterator[TarSample]:
    """The samples of the tar read from `f` (see the module docstring). `max_bytes(extension)`:
    members above it are refused unread. A sample that would hold more than `max_sample_bytes`
    (default MAX_SAMPLE_BYTES) keeps nothing: its one refusal is SAMPLE_TOO_LARGE, the rest of
    its members are not read.
    Damage raises TarDamaged, after yielding the sample before the member it broke in when that
    member began a new one."""
    max_sample_bytes = MAX_SAMPLE_BYTES if max_sample_bytes is None else max_sample_bytes
    sample: TarSample | None = None
    members = held = 0  # held: what the current sample holds (MAX_SAMPLE_BYTES)
    over = False  # the current sample went over max_sample_bytes

    def limit(name: str, size: int) -> bool:
        key, ext = split_name(name) or (None, "")
        same = sample is not None and key == sample.key
        return (key is not None and (max_bytes is None or size <= max_bytes(ext))
                and not (same and over)
                and (held if same else 0) + BLOCK + len(name) + size <= max_sample_bytes)

    try:
        for m in iter_members(f, offset, limit):
            members += 1
            split = split_name(m.name)
            if split is None:  # a sample of its own; the current one goes on
                yield TarSample(m.name, refused=[(m.name, NO_EXTENSION, m.size)],
                                offset=m.offset, next_offset=m.offset)
                continue
            key, ext = split
            if sample is not None and key != sample.key:
                sample.next_offset = m.offset
                yield sample
                sample = None
            if sample is None:
                sample, held, over = TarSample(key, offset=m.offset), 0, False
            if over:
                continue
            held += BLOCK + len(m.name) + (m.size if m.data is not None else 0)
            if held > max_sample_bytes or _held_back(m, ext, max_bytes):
                over = True
                sample.members.clear()
                sample.refused = [(m.name, SAMPLE_TOO_LARGE, m.size)]
            elif m.data is None:
                sample.refused.append((m.name, _refusal(m), m.size))
            elif ext in sample.members:  # the first one stays; webdataset would stop here
                sample.refused.append((m.name, REPEATED, m.size))
            else:
                sample.members[ext] = m.data
    except _DAMAGE as e:
        cut = split_name(getattr(e, "member", None) or "")
        if cut is not None:  # it broke inside a member's data: its header was read
            members += 1
            if sample is not None and cut[0] != sample.key:  # complete: yield it
                sample.next_offset = e.member_offset
                yield sample
                sample = None
            if sample is None:
                sample = TarSample(cut[0])
        pending = sample.key if sample is not None else None
        raise TarDamaged(f"{type(e).__name__}: {e}", pending, members) from e
    if sample is not None:
        yield sample


class ReadFailed(OSError):
    """Opening or reading a file failed (I/O, network, the file gone: the same read may work
    again), as opposed to bytes that are bad (TarDamaged). Its __cause__ is the filesystem's
    error."""


def read_failure(e: BaseException | None) -> ReadFailed | None:
    """The ReadFailed that `e` is or was raised from (TarDamaged wraps one), else None."""
    while e is not None and not isinstance(e, ReadFailed):
        e = e.__cause__
    return e


# Seconds before each new try of a failed read: ~15 s in all, on top of s3fs's and botocore's own
# retries (~2 s and up to ~15 s, of a request). An outage outlasting them stops the reader.
READ_RETRY_PAUSES = (1.0, 2.0, 4.0, 8.0)


class ReadRetries:
    """A failed read (I/O, network, the file gone; s3fs and botocore retried the request already)
    is read again from the same sample after each pause of READ_RETRY_PAUSES, then raised:
    skipping it as damage would make what a reader gives depend on the network (and a resumed
    run differ). The reader sets `failed` to 0 after each sample that it got past."""

    def __init__(self, logger: logging.Logger):
        self.log, self.failed = logger, 0  # failed: tries in a row, at the current position

    def pause(self, where: str, failure: ReadFailed, then: str = "A resume continues from the "
              "last checkpoint exactly once the shard reads again") -> None:
        """Wait before `where` ("URL: reading from byte N") is read again; after the last try
        raise an OSError naming it, then saying `then` (what a rerun does)."""
        cause = failure.__cause__ or failure
        tries = self.failed + 1
        if self.failed == len(READ_RETRY_PAUSES):
            raise OSError(f"{where} failed {tries} times in a row, last: {type(cause).__name__}: "
                          f"{cause}. {then}") from failure
        pause = READ_RETRY_PAUSES[self.failed]
        self.failed = tries
        self.log.warning("%s failed (%s: %s); trying again in %g s (%d of %d)", where,
                         type(cause).__name__, cause, pause, tries, len(READ_RETRY_PAUSES))
        time.sleep(pause)


def failed_read(e: Exception) -> ReadFailed:
    """The filesystem's error `e` as a ReadFailed (raise it from e)."""
    return ReadFailed(f"{type(e).__name__}: {e}")


class _Reads:
    """An archive's file whose OSErrors (and a store's other errors: a dead S3 endpoint's) are
    ReadFailed: the decompressors raise OSErrors of their own over bad bytes (gzip's
    BadGzipFile, bz2's), which must not pass for a failed read."""

    def __init__(self, f: BinaryIO):
        self.f, self.count = f, 0  # count: bytes read

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.f.read(n)
        except storage.STORE_ERRORS as e:
            raise failed_read(e) from e
        self.count += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return self.f.seek(offset, whence)
        except storage.STORE_ERRORS as e:
            raise failed_read(e) from e

    def __getattr__(self, name: str) -> Any:  # tell, seekable, ...: as the file's
        return getattr(self.f, name)


class _Inflation:
    """A decompressed archive that raises ReadError once it gave more than MAX_INFLATION times
    the compressed bytes read (past INFLATION_FLOOR): a decompression bomb."""

    def __init__(self, f: BinaryIO, raw: _Reads):
        self.f, self.raw, self.out = f, raw, 0  # out: decompressed bytes given

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.out += len(data)
        if self.out > max(INFLATION_FLOOR, MAX_INFLATION * self.raw.count):
            raise tarfile.ReadError(f"decompression bomb: {self.out} bytes from {self.raw.count} "
                                    f"compressed (over {MAX_INFLATION}x), not read further")
        return data

    def seek(self, offset: int) -> None:
        """Forward from the start (a resume), read under the same bound."""
        while self.out < offset and self.read(min(offset - self.out, _SKIP_CHUNK)):
            pass


def _is_header(block: bytes) -> bool:
    """Whether `block` is a whole tar header block whose checksum matches."""
    try:
        return len(block) == BLOCK and _checksum_matches(block, 0)
    except tarfile.ReadError:  # a checksum field that is no number
        return False


@contextlib.contextmanager
def open_tar(url: str, offset: int = 0) -> Iterator[BinaryIO]:
    """The tar at `url` (local or fsspec URL) positioned at `offset`; a gzip, bz2 or xz archive
    is decompressed on the fly, `offset` counting decompressed bytes. An OSError opening or
    reading the file is a ReadFailed."""
    fs, path = storage.filesystem(url)
    try:
        opened = fs.open(path, "rb")
    except storage.STORE_ERRORS as e:
        raise failed_read(e) from e
    with opened:
        raw = _Reads(opened)
        head = raw.read(BLOCK)
        # A tar header first: a plain tar, even where its first name begins like a magic ("BZh").
        opener = None if _is_header(head) else \
            next((o for m, o in _COMPRESSED if head.startswith(m)), None)
        if opener is None:
            raw.seek(offset)
            yield raw
            return
        raw.seek(0)
        with opener(raw) as f:
            bounded = _Inflation(f, raw)
            bounded.seek(offset)  # it reads its way there (forward only)
            yield bounded


def read_samples(url: str, offset: int = 0, max_bytes: Callable[[str], int] | None = None
                 ) -> Iterator[TarSample]:
    """The samples of the tar at `url` from byte `offset`, in stored order (iter_samples)."""
    with open_tar(url, offset) as f:
        try:
            yield from iter_samples(f, offset, max_bytes)
        except TarDamaged as e:
            raise TarDamaged(f"{url}: {e}", e.pending, e.members) from e


def iter_shard(url: str, offset: int = 0, max_bytes: Callable[[str], int] | None = None
               ) -> Iterator[tuple[dict[str, Any], int, int | None]]:
    """(sample, its byte offset, the next sample's byte offset or None at the end) of each
    sample of which something was read, the sample in webdataset's form (as_dict): what the
    training readers use (a resumed token stream seeks to the next offset). `max_bytes`: as in
    iter_samples (members over it are left out unread)."""
    for sample in read_samples(url, offset, max_bytes):
        if sample.members:
            yield sample.as_dict(url), sample.offset, sample.next_offset
