"""Webdataset tars: the one reader of bdt (raw image-caption shards and token shards alike; the
one writer is shard_writer.py). This module groups members into samples; tar_headers.py reads
the members, tar_reads.py opens the file (decompression, failed reads).

Reading. A sample is a run of consecutive members sharing a key, webdataset's rule: the key is
the member path up to the first dot of its base name, the rest is the extension (lowercased).
Members whose path is absolute or climbs out with `..` are never read (a data file must not
name places outside itself), nor are links, devices and members over the caller's size limit:
they are listed in `TarSample.refused`, for callers that account for every input (extraction)
while the training readers just use what was read. So is a second member of one sample with
the same extension (webdataset stops there; here the first one read stays). A member without an
extension is a sample of its own (key = its path, nothing read). A sample whose members would
hold more than MAX_SAMPLE_BYTES in all keeps none of them (one SAMPLE_TOO_LARGE refusal).

Every sample carries the byte offset of its first header, so a resumed stream seeks straight to
its next unread sample. A tar whose headers or data are bad (tar_headers.py), a decompressor's
error or a decompression bomb (tar_reads.py) raise `TarDamaged` (a `tarfile.ReadError`), naming
the sample that was being read; a failed read is a `ReadFailed` (tar_reads.py), tried again.
"""

from __future__ import annotations

import logging
import lzma
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from bdt.data.tar_headers import BLOCK, Member, iter_members, unsafe_path
from bdt.data.tar_reads import open_tar

# What the training readers read of one member at most (the sample is skipped beyond): a hostile
# multi-GB member would otherwise be read whole into a data worker, killing it again after every
# resume. The extraction job's default max_image_bytes; a token sample's bits are KBs.
MAX_MEMBER_BYTES = 64 * 1024 * 1024
# What one sample holds at most (its members' data and names, a block each): members of many
# extensions, each under its limit, would otherwise add up (a MB of gzip held 240 MiB).
MAX_SAMPLE_BYTES = 4 * MAX_MEMBER_BYTES
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
    would otherwise flood the log once per sample, again after every resume. A sample's key goes
    in as %r: it comes from a tar's member names, which may hold line breaks and terminal escapes."""
    if count <= limit:
        tail = f" (further ones are only counted{counted_in})" if count == limit else ""
        logger.warning(message + "%s", *args, tail)


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
