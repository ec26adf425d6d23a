"""Opening a tar for bdt's reader (tars.py): a local or fsspec URL, gzip, bz2 and xz archives
decompressed on the fly. Their offsets count decompressed bytes, so a resume there decompresses
its way back (slow, but it lands on the same sample); one decompressing to over MAX_INFLATION
times its compressed bytes besides the data kept (a decompression bomb) raises
`tarfile.ReadError`. An OSError opening or reading the file is a `ReadFailed` (inside TarDamaged
when it came mid-tar; `read_failure` finds it): the bytes may read fine again, so the readers try
again (`ReadRetries`) instead of skipping them as damage.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import logging
import lzma
import tarfile
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from bdt import storage
from bdt.data.tar_headers import BLOCK, SKIP_CHUNK, is_header

# A compressed archive may decompress to at most MAX_INFLATION times the compressed bytes read,
# past its first INFLATION_FLOOR bytes, besides the members' data its reader keeps; beyond that
# it is a decompression bomb, stopped as damage (stepping over members, headers included,
# decompressed them all: GBs of CPU in every rank, every epoch). The data kept is bounded as in
# a plain tar, per member and sample (tars.py), not by its ratio: flat
# pictures in BMP, PPM or TIFF (image_extensions) reach zeros' ratios (200-1000x in gzip,
# 500-17000x in bz2 and xz). Measured (gzip / bz2 / xz): the demo's raw JPEG shards
# 2.4 / 2.5 / 2.5x; token shards of random bits 1.2-3.8x, of bits 90% ones 5.9 / 6.5 / 7.4x; the
# tests' all-zero token shards, a few MB, 170 / 300 / 330x; zeros 1030x in gzip, more in the others.
MAX_INFLATION = 100
INFLATION_FLOOR = 256 << 20
_COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)), (b"BZh", bz2.BZ2File),
               (b"\xfd7zXZ\x00", lzma.LZMAFile))


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
    """A decompressed archive that raises ReadError once what it gave besides the members' data
    the reader keeps (`read_kept`) is more than MAX_INFLATION times the compressed bytes read (past
    INFLATION_FLOOR): a decompression bomb."""

    def __init__(self, f: BinaryIO, raw: _Reads):
        self.f, self.raw = f, raw
        self.out = self.unkept = 0  # decompressed bytes given; of them, not kept as data

    def read(self, n: int = -1) -> bytes:
        data = self.read_kept(n)
        self.unkept += len(data)
        if self.unkept > max(INFLATION_FLOOR, MAX_INFLATION * self.raw.count):
            raise tarfile.ReadError(f"decompression bomb: {self.unkept} bytes besides the data "
                                    f"read from {self.raw.count} compressed (over "
                                    f"{MAX_INFLATION}x), not read further")
        return data

    def read_kept(self, n: int) -> bytes:
        """The next n bytes at most, a member's data the reader keeps (tar_headers._read)."""
        data = self.f.read(n)
        self.out += len(data)
        return data

    def seek(self, offset: int) -> None:
        """Forward from the start (a resume), to an offset the reader reached under the bound."""
        while self.out < offset and self.read_kept(min(offset - self.out, SKIP_CHUNK)):
            pass


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
        opener = None if is_header(head) else \
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
