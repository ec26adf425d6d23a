"""Raw inputs read: one input unit (input_units.py) read robustly, a verdict per sample.

Reading never raises for bad data: every problem becomes a `Reject` (key, source, reason) so the
job can account for every input (inputs = written + rejected), with one verdict per sample: the
members of a tar sample (same key) are judged together, so a sample with two bad members is one
reject. A sample with several image members is made from the first in `image_extensions`
order (webdataset's "jpg;png" convention; the caption is one, so is the sample). A truncated or
unreadable tar yields one `truncated_tar` / `unreadable_shard` reject for
whatever could not be read. A failed read (I/O, network, the file gone) is no bad data: it is
tried again from the same sample (tar_reads.ReadRetries), then fails the unit, so a rerun reads it.
Tars are read by bdt.data.tars, bdt's one tar reader (gzip, bz2 and xz archives too).
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
from dataclasses import dataclass
from typing import Iterator

import fsspec

from bdt import storage
from bdt.data import tar_headers, tar_reads, tars
from bdt.data.images import TOO_LARGE
from bdt.data.token_shards import caption_problem, caption_text
from bdt.extract.input_units import InputUnit, folder_files, images_by_stem, split_ext

log = logging.getLogger(__name__)

# Reject reasons produced here (images.py, the worker and, for captions, token_shards.py add
# their own: empty_caption, caption_control_char).
UNSAFE_PATH = "unsafe_path"
NOT_A_FILE = "not_a_file"
UNKNOWN_EXTENSION = "unknown_extension"
MISSING_IMAGE = "missing_image"
DUPLICATE_KEY = "duplicate_key"
TRUNCATED_TAR = "truncated_tar"
UNREADABLE_SHARD = "unreadable_shard"
MISSING_CAPTION = "missing_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
CAPTION_TOO_LONG = "caption_too_long"

# A failed read (not bad data) that persists fails the unit: its samples are not rejected, and
# the unit, left without markers, is read again by a rerun.
_FAILED_UNIT = "The unit failed: a rerun reads it again"
_SIDE_EXTS = ("txt", "json")  # members that belong to a sample without being its image


@dataclass
class RawSample:
    key: str
    image: bytes
    image_ext: str
    caption: bytes | None  # None: no caption member

    def __post_init__(self):
        self.key = tars.readable(self.key)  # written as source_key into the shard's JSON


@dataclass
class Reject:
    key: str
    source: str
    reason: str
    detail: str = ""

    def __post_init__(self):
        self.key = tars.readable(self.key)  # written into the rejects file

    def to_dict(self) -> dict:
        return {"key": self.key, "source": self.source, "reason": self.reason, "detail": self.detail}


def _folder_strays(fs: fsspec.AbstractFileSystem, root: str,
                   image_exts: list[str]) -> list[tuple[str, str, str]]:
    """(file, reject reason, detail) of each file in a folder that is neither a used image nor
    the caption or metadata of one."""
    rels = list(folder_files(fs, root))
    used = images_by_stem(rels, image_exts)
    out = []
    for rel in rels:
        stem, ext = split_ext(rel)
        if used.get(stem) == rel or (ext in _SIDE_EXTS and stem in used):
            continue
        if ext in image_exts:
            out.append((rel, DUPLICATE_KEY, f"key {stem!r} uses the image {used[stem]!r}"))
        elif ext in _SIDE_EXTS:
            out.append((rel, MISSING_IMAGE, ""))
        else:
            out.append((rel, UNKNOWN_EXTENSION, f"extension '{ext}'" if ext else "no extension"))
    return out


def iter_unit(unit: InputUnit, image_exts: list[str], max_image_bytes: int, *,
              max_caption_bytes: int) -> Iterator[RawSample | Reject]:
    if unit.kind == "tar":
        yield from _iter_tar(unit, image_exts, max_image_bytes, max_caption_bytes)
    else:
        yield from _iter_folder(unit, image_exts, max_image_bytes, max_caption_bytes)


def _iter_folder(unit: InputUnit, image_exts: list[str], max_image_bytes: int,
                 max_caption_bytes: int) -> Iterator[RawSample | Reject]:
    fs, root = storage.filesystem(unit.source)
    if unit.report_strays:  # once per folder, so orphan captions and unknown files are accounted
        for rel, reason, detail in _folder_strays(fs, root, image_exts):
            yield Reject(rel, unit.name, reason, detail)
    retries = tar_reads.ReadRetries(log)
    captions: dict[str, dict[str, str]] = {}  # the unit's folders listed once (_caption_path)
    for rel in unit.files:
        item = None
        while item is None:
            try:
                item = _folder_sample(fs, root, rel, unit.name, max_image_bytes, max_caption_bytes,
                                      captions)
            except tar_reads.ReadFailed as exc:
                retries.pause(f"{unit.name}: reading {rel!r}", exc, _FAILED_UNIT)
        retries.failed = 0
        yield item


def _folder_sample(fs: fsspec.AbstractFileSystem, root: str, rel: str, src: str,
                   max_image_bytes: int, max_caption_bytes: int,
                   captions: dict[str, dict[str, str]]) -> RawSample | Reject:
    """The verdict on one image of a folder unit and its caption. An OSError reading them (I/O,
    network, the file gone) is a failed read, not bad data: raised as tar_reads.ReadFailed."""
    stem, ext = split_ext(rel)
    try:
        image = _folder_file(fs, posixpath.join(root, rel), max_image_bytes, TOO_LARGE)
        path = _caption_path(fs, root, stem, captions)
        caption = None if path is None else _folder_file(fs, path, max_caption_bytes,
                                                         CAPTION_TOO_LONG)
    except _Refused as exc:
        return Reject(stem, src, exc.reason, exc.detail)
    except OSError as exc:
        raise tar_reads.failed_read(exc) from exc
    return RawSample(stem, image, ext, caption)


def _caption_path(fs: fsspec.AbstractFileSystem, root: str, stem: str,
                  captions: dict[str, dict[str, str]]) -> str | None:
    """stem.txt, or its spelling in another case (a.TXT): extensions are case-blind, as in tars.
    None when the folder's listing has none. `captions` caches {folder: {base stem: caption
    path}}: listing the folder per uncaptioned image made a large folder's unit take minutes."""
    path = posixpath.join(root, stem + ".txt")
    if fs.exists(path):
        return path
    folder = posixpath.dirname(path)
    if folder not in captions:
        found: dict[str, str] = {}
        for other in sorted(fs.ls(folder, detail=False)):  # sorted: the same pick on every run
            base, ext = split_ext(posixpath.relpath(other, folder))
            if ext == "txt":
                found.setdefault(base, other)
        captions[folder] = found
    return captions[folder].get(posixpath.basename(stem))


class _Refused(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _folder_file(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int, too_large: str) -> bytes:
    """One file of a folder unit, read; links and non-files are refused unread, as in tars (a
    caption linked to a file elsewhere would copy that file into the shards)."""
    try:
        info = fs.info(path)
    except OSError:
        if not getattr(fs, "islink", lambda _: False)(path):
            raise
        info = {"islink": True}  # one that leads nowhere (or in a loop): refused, not retried
    name = posixpath.basename(path)
    if info.get("islink") or info["type"] != "file":
        raise _Refused(NOT_A_FILE, f"{name!r} is a link or not a regular file")
    if info["size"] > max_bytes:
        raise _Refused(too_large, f"{name!r} of {info['size']} bytes exceeds the limit {max_bytes}")
    return fs.cat_file(path)


def _iter_tar(unit: InputUnit, image_exts: list[str], max_image_bytes: int,
              max_caption_bytes: int) -> Iterator[RawSample | Reject]:
    """One verdict per sample of the tar (bdt.data.tars groups members by key). Members are not
    read when their path is unsafe, they are not regular files, or they exceed their limit
    (max_caption_bytes for the caption, else max_image_bytes) or their sample's (too_large)."""
    src = unit.name
    seen: set[str] = set()

    def limit(ext: str) -> int:
        return max_caption_bytes if ext == "txt" else max_image_bytes

    # Room for a sample of a few images at their limit (tars.MAX_SAMPLE_BYTES at the default).
    max_sample = max(tars.MAX_SAMPLE_BYTES, 4 * max_image_bytes)

    def verdict(s: tars.TarSample) -> RawSample | Reject:
        if not s.members and s.refused and s.refused[0][1] == tars.NO_EXTENSION:
            reason = UNSAFE_PATH if tar_headers.unsafe_path(s.key) else UNKNOWN_EXTENSION
            return Reject(s.key, src, reason, "member name has no extension")
        if s.key in seen:
            return Reject(s.key, src, DUPLICATE_KEY, "key appears in two separate places in the shard")
        seen.add(s.key)
        oversized = {}  # extension -> size of a member that was not read
        for name, why, size in s.refused:
            if why == tars.UNSAFE_PATH:
                return Reject(s.key, src, UNSAFE_PATH, f"absolute or '..' member path {name!r} ignored")
            if why == tars.NOT_A_FILE:
                return Reject(s.key, src, NOT_A_FILE, f"member {name!r} is a link or device")
            if why == tars.REPEATED:
                return Reject(s.key, src, DUPLICATE_KEY, f"member {name!r} appears twice in a row")
            if why == tars.SAMPLE_TOO_LARGE:
                return Reject(s.key, src, TOO_LARGE, f"its members hold over {max_sample} bytes "
                              f"in all (at {name!r})")
            oversized[tars.split_name(name)[1]] = size
        image_ext = next((e for e in image_exts if e in s.members), None)
        if image_ext is None:
            big = sorted(e for e in oversized if e in image_exts)
            if big:
                return Reject(s.key, src, TOO_LARGE, f"{big[0]} member of {oversized[big[0]]} bytes "
                              f"exceeds max_image_bytes {max_image_bytes}")
            unknown = sorted(e for e in {**s.members, **oversized} if e not in _SIDE_EXTS)
            if unknown:
                return Reject(s.key, src, UNKNOWN_EXTENSION, f"members {unknown}, expected one of {image_exts}")
            return Reject(s.key, src, MISSING_IMAGE, f"only {sorted(s.members)}")
        if "txt" in oversized:
            return Reject(s.key, src, CAPTION_TOO_LONG, f"txt member of {oversized['txt']} bytes "
                          f"exceeds max_caption_bytes {max_caption_bytes}")
        return RawSample(s.key, s.members[image_ext], image_ext, s.members.get("txt"))

    offset, retries = 0, tar_reads.ReadRetries(log)  # offset: where the next sample starts
    inside = 0  # verdicts given since offset on members without an extension (inside a sample)
    while True:
        again = inside  # a read again from offset meets those first: given already
        stack = contextlib.ExitStack()
        try:
            f = stack.enter_context(tar_reads.open_tar(unit.source, offset))
        except tar_reads.ReadFailed as exc:
            retries.pause(f"{src}: reading from byte {offset}", exc, _FAILED_UNIT)
            continue
        except Exception as exc:  # noqa: BLE001 - whatever stops the opening is the unit's verdict
            yield Reject("", src, UNREADABLE_SHARD, f"{type(exc).__name__}: {exc}"[:200])
            return
        with stack:
            try:
                for sample in tars.iter_samples(f, offset, limit, max_sample):
                    retries.failed = 0
                    if sample.next_offset != sample.offset:
                        offset, inside = sample.next_offset, 0
                    elif again:
                        again -= 1
                        continue
                    else:
                        inside += 1
                    yield verdict(sample)
                return
            except tars.TarDamaged as exc:
                failure = tar_reads.read_failure(exc)
                if failure is None:
                    yield _damaged(exc, src, seen)
                    return
        retries.pause(f"{src}: reading from byte {offset}", failure, _FAILED_UNIT)


def _damaged(exc: tars.TarDamaged, src: str, seen: set[str]) -> Reject:
    """The reject for what a damaged tar left unread."""
    detail = str(exc)[:200]
    if not exc.members:
        return Reject("", src, UNREADABLE_SHARD, detail)  # not a tar at all
    if exc.pending is not None and exc.pending not in seen:
        return Reject(exc.pending, src, TRUNCATED_TAR, detail)  # may be incomplete
    return Reject("", src, TRUNCATED_TAR, detail)


def check_caption(raw: bytes | None, max_bytes: int) -> tuple[str | None, str, str]:
    """(caption or None, reject reason, detail)."""
    if raw is None:
        return None, MISSING_CAPTION, "no .txt member"
    if len(raw) > max_bytes:
        return None, CAPTION_TOO_LONG, f"{len(raw)} bytes > max_caption_bytes {max_bytes}"
    try:
        text = caption_text(raw)
    except UnicodeDecodeError as exc:
        return None, CAPTION_NOT_UTF8, str(exc)[:200]
    problem = caption_problem(text)  # the token readers refuse the same captions
    if problem is not None:
        return None, *problem
    return text, "", ""
