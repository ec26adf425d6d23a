"""Raw inputs listed as input units, before any is read.

An input unit is what one output shard per stage is made from (the shard plan, run.plan):
one tar shard (img2dataset layout: KEY.jpg|png|webp + KEY.txt + optional KEY.json), or a
fixed-size chunk of a folder's sorted image files (captions in same-named .txt files). Each
unit records the version (sizes and mtimes, ETags on S3) of what it reads. Problems found here
(a pattern matching nothing, a missing tar, a name that is not UTF-8, the output inside a
folder input) stop the run before any work; input_reading.py reads a unit.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import asdict, dataclass, field

import fsspec

from bdt import storage, url_listing

_TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")


@dataclass
class InputUnit:
    index: int
    kind: str  # "tar" | "folder"
    source: str  # tar URL, or folder root URL, as spelled in `inputs`: what is read
    files: list[str] = field(default_factory=list)  # folder: image paths relative to `source`
    report_strays: bool = False  # folder: this unit also rejects the folder's non-image files
    # Sizes and mtimes (ETags on S3) of what the unit reads, as listed: recorded in its markers,
    # so a rerun refuses an input replaced in place instead of keeping its old shards.
    version: str = ""
    # `source` as it resolves (resolved_url), set on the driver: what the plan, markers and rejects
    # name, so `im/`, `./im` and its absolute path are one input and `im` read elsewhere another.
    resolved: str = ""

    def __post_init__(self) -> None:
        if not self.resolved:
            self.resolved = resolved_url(self.source)

    @property
    def name(self) -> str:
        """Source label recorded per sample and per reject."""
        if self.kind == "tar":
            return self.resolved
        return f"{self.resolved}#{self.index:06d}"

    def named_by(self, recorded: str) -> bool:
        """Whether a marker's source is this unit: its name, or the name as an earlier bdt wrote
        it (the input as spelled then, resolved here: a relative one from this folder)."""
        suffix = "" if self.kind == "tar" else f"#{self.index:06d}"
        return recorded == self.name or (recorded.endswith(suffix) and
                                         resolved_url(recorded[:len(recorded) - len(suffix)]) == self.resolved)

    def to_dict(self) -> dict:
        return asdict(self)

    def plan_entry(self) -> dict:
        """What plan.json records: which inputs make the unit. Their version is per shard, in the
        markers, so a unit redone from a changed input takes the new one."""
        return {"index": self.index, "kind": self.kind, "source": self.resolved, "files": list(self.files),
                "report_strays": self.report_strays}


def list_units(spec: str, input_format: str, folder_shard_size: int, image_exts: list[str]) -> list[InputUnit]:
    """The ordered input units; raises ValueError naming the pattern that matches nothing."""
    urls = url_listing.expand_urls(spec, "inputs")
    if not urls:  # a list of empty items (`,`)
        raise ValueError(f"inputs: '{spec}' names no input")
    seen: set[str] = set()  # one input named twice (a.tar,./a.tar, a link) is read once, as first spelled
    urls = [u for u in urls if not (resolved_url(u) in seen or seen.add(resolved_url(u)))]
    _refuse_undecodable_names(urls, "input")
    if input_format not in ("auto", "tar", "folder"):
        raise ValueError(f"input_format: expected auto, tar or folder, got '{input_format}'")
    formats = [input_format if input_format != "auto" else "tar" if _is_tar_name(url) else "folder"
               for url in urls]
    infos = url_listing.file_infos([u for u, fmt in zip(urls, formats) if fmt == "tar"])
    versions = {u: None if info is None else _version(info) for u, info in infos.items()}
    missing = [u for u, v in versions.items() if v is None]
    if missing:
        # A folder named x.tar (an S3 prefix too) is no tar shard: "not found" alone hid what a glob found.
        raise ValueError(f"inputs: {len(missing)} tar shard(s) not found or not a file, e.g. {missing[0]}")
    units: list[InputUnit] = []
    for url, fmt in zip(urls, formats):
        if fmt == "tar":
            units.append(InputUnit(len(units), "tar", url, version=versions[url]))
            continue
        fs, path = storage.filesystem(url)
        if not fs.isdir(path):
            raise ValueError(f"inputs: folder not found: {url} (a tar shard must end in .tar/.tgz/.tar.gz)")
        listing = folder_files(fs, path)
        images = sorted(images_by_stem(list(listing), image_exts).values())
        _refuse_undecodable_names([posixpath.join(url, rel) for rel in images], "image file")
        if not images:
            raise ValueError(f"inputs: folder {url} holds no images with extensions {image_exts}")
        for start in range(0, len(images), folder_shard_size):
            chunk = images[start:start + folder_shard_size]
            units.append(InputUnit(len(units), "folder", url, chunk, report_strays=start == 0,
                                   version=_chunk_version(listing, chunk)))
    return units


def _is_tar_name(url: str) -> bool:
    """By its name, less the version an S3 URL may select (`a.tar?versionId=...`)."""
    return url.split(url_listing.VERSION_QUERY, 1)[0].endswith(_TAR_SUFFIXES)


def _version(info: dict) -> str:
    """Size and mtime (local) or ETag (S3; LastModified where a store has no ETag) of a listing entry."""
    stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info['size']}:{str(stamp).strip(chr(34))}"


def _chunk_version(listing: dict[str, dict], chunk: list[str]) -> str:
    """One digest of the versions of a folder unit's images and their caption/metadata files."""
    stems = {split_ext(rel)[0] for rel in chunk}
    parts = [(rel, _version(info)) for rel, info in sorted(listing.items()) if split_ext(rel)[0] in stems]
    return hashlib.sha256(json.dumps(parts).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def resolved_url(url: str) -> str:
    """One spelling per input: local paths resolved (links, '..', './', '//', relative, a trailing
    '/'), remote URLs with empty and '.' path segments dropped (a trailing '/' too)."""
    if storage.is_remote(url):
        scheme, _, rest = url.partition("://")
        return scheme + "://" + "/".join(p for p in rest.split("/") if p not in ("", "."))
    return storage.real_local_path(url)


def refuse_output_inside(units: list[InputUnit], output: str) -> None:
    """A local output inside a folder input would be listed as that folder's files: the job's
    own shards and manifest, rejected as inputs on every rerun."""
    if storage.is_remote(output):
        return
    out = storage.real_local_path(output)
    for unit in units:
        if unit.kind == "folder" and not storage.is_remote(unit.source):
            root = storage.real_local_path(unit.source)
            if out == root or out.startswith(root.rstrip(os.sep) + os.sep):
                raise ValueError(f"output: {output} is inside the folder input {unit.source}; put the "
                                 f"output outside it")


def _refuse_undecodable_names(paths: list[str], what: str) -> None:
    """Input names go into plan.json, the markers and the manifest (JSON, UTF-8), and identify
    the input on every rerun; a name that is not UTF-8 stops the run before any work, so a
    rename fixes it and nothing was made from (or left out of) an output."""
    bad = [p for p in paths if not _is_utf8(p)]
    if bad:
        shown = ", ".join(repr(p.encode("utf-8", "surrogateescape")) for p in bad[:3])
        raise ValueError(f"inputs: {len(bad)} {what} name(s) are not valid UTF-8: {shown}"
                         f"{', ...' if len(bad) > 3 else ''}; rename them (e.g. `convmv -f latin1 "
                         f"-t utf8`) and rerun")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # os.fsdecode keeps undecodable bytes as lone surrogates
    except UnicodeEncodeError:
        return False
    return True


def split_ext(rel: str) -> tuple[str, str]:
    """(stem, lowercased extension) of a folder file: the key is the path up to the base name's
    last dot; the extension is '' when the base name has none (a file named just 'jpg')."""
    stem, ext = posixpath.splitext(rel)
    return stem, ext[1:].lower()


def folder_files(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict]:
    """{path relative to root: listing entry}, sorted by path, hidden names left out (a file or
    folder below root whose name starts with '.'), as a wildcard matches none (url_listing):
    macOS's `._x.png` resource forks, `.ipynb_checkpoints/` copies and `.git/` are no data."""
    found = fs.find(root, detail=True)
    rels = ((posixpath.relpath(p, root.rstrip("/")), p) for p in sorted(found))
    return {rel: found[p] for rel, p in rels if not any(part.startswith(".") for part in rel.split("/"))}


def images_by_stem(rels: list[str], image_exts: list[str]) -> dict[str, str]:
    """{stem: the image file used for it}: of several images with one stem, the first extension
    in image_exts order, the rule of a tar sample with several image members."""
    found: dict[str, dict[str, str]] = {}
    for rel in rels:
        stem, ext = split_ext(rel)
        if ext in image_exts:
            found.setdefault(stem, {}).setdefault(ext, rel)
    return {stem: exts[next(e for e in image_exts if e in exts)] for stem, exts in found.items()}
