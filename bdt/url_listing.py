"""Many URLs at once: what a spec of brace patterns and globs names, and which of a list of
URLs are files, with their sizes, in few store requests (one listing per S3 prefix).

storage.py holds the single-URL helpers these are built on.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import stat

from braceexpand import braceexpand

from bdt import storage


def glob_urls(pattern: str, doing: str = "") -> list[str]:
    """The URLs a glob matches, sorted, by one rule on every store: the shell's and Python's.
    `**` matches folders at any depth (none too), as fsspec does on object stores (`d/**/*.tar`
    named only `d/*/*.tar` locally). A wildcard matches no name that starts with a dot unless
    its part of the pattern starts with one (`d/.*.tar`): fsspec's S3 glob matched them and
    Python's local one did not, so one pattern read other files there, among them macOS's
    `._x.tar` copies of resource forks and bdt's own hidden temps. `doing` names the listing in
    a store's error (storage.naming_url)."""
    if storage.is_remote(pattern):
        fs, path = storage.filesystem(pattern)
        fs.invalidate_cache()  # a glob lists prefixes it cannot name in advance: all of them
        proto = pattern.split("://", 1)[0]
        with storage.naming_url(pattern, doing):
            found = fs.glob(path)
        parts = path.strip("/").split("/")
        return [f"{proto}://{p}" for p in sorted(found)
                if _shown(parts, p.strip("/").split("/"))]
    if pattern.startswith(("~", "file:")):  # as read: `~/d/*.tar` matched nothing in a folder `~`
        pattern = storage.local_path(pattern)
    return sorted(glob.glob(pattern, recursive=True))


def _shown(pattern: list[str], name: list[str]) -> bool:
    """Whether the path parts `name` match the glob's parts `pattern` with no wildcard taking a
    leading dot (Python's glob rule: `**` takes no hidden folder, `*` no hidden name)."""
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_shown(rest, name[i:]) for i in range(len(name) + 1)
                   if not any(part.startswith(".") for part in name[:i]))
    return bool(name) and fnmatch.fnmatchcase(name[0], head) and \
        (head.startswith(".") or not name[0].startswith(".")) and _shown(rest, name[1:])


def url_patterns(spec: str) -> list[str]:
    """The names and globs of a comma list of brace patterns, braces expanded, in order."""
    return [pattern for part in brace_patterns(spec) for pattern in braceexpand(part)]


def brace_patterns(spec: str) -> list[str]:
    """The brace patterns of a comma list, in order. Split at the commas outside braces only,
    and not at the glob class `[,]`: `in-{000000,000002}.tar` is one brace pattern, and
    `run[,]v2/*.tar` names the folder `run,v2` (a name holding a comma had no spelling)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(spec):
        depth += {"{": 1, "}": -1}.get(spec[i], 0)
        if spec.startswith("[,]", i):
            i += 2
        elif spec[i] == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
        i += 1
    parts.append(spec[start:])
    return [part.strip() for part in parts if part.strip()]


def expand_urls(spec: str, key: str) -> list[str]:
    """URLs named by a comma list of brace patterns and globs (`a-{000..009}.tar,b/*.tar`).

    In the order given, globs sorted, duplicates dropped. Plain names are returned as they are
    (existence is the caller's check). A glob that matches nothing is taken as a name when a
    file has it as it is: `img[1].tar`, or `x.tar?versionId=...` (one version of an S3 object),
    whose glob characters are part of the name. A list item that names nothing then is a
    ValueError naming it and `key`: a typo in one of three patterns would drop a third of the
    data unnoticed. An item is matched whole: `d/*.{tar,tgz}` needs one of the two.
    """
    urls: list[str] = []
    for item in brace_patterns(spec):
        found: list[str] = []
        for pattern in braceexpand(item):
            if not any(c in pattern for c in "*?["):
                found.append(pattern)
                continue
            matches = glob_urls(pattern)
            found.extend(matches if matches or not storage.exists(pattern) else [pattern])
        if not found:
            raise ValueError(f"{key}: '{item}' matches nothing" + (
                f" (an item of '{spec}')" if item != spec.strip() else ""))
        urls.extend(found)
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]


def missing_files(urls: list[str]) -> list[str]:
    """The URLs (in order) that are not existing files (see `file_sizes`)."""
    sizes = file_sizes(urls)
    return [u for u in urls if sizes[u] is None]


def file_sizes(urls: list[str]) -> dict[str, int | None]:
    """{url: size in bytes, or None when it is not an existing file}, in the order given
    (`file_infos`)."""
    return {u: None if info is None else int(info["size"]) for u, info in file_infos(urls).items()}


def file_infos(urls: list[str]) -> dict[str, dict | None]:
    """{url: its listing entry (at least "size"; "mtime" locally, "ETag" on S3), or None when it
    is not an existing file}, in the order given.

    Remote: one directory listing per parent holding two or more of the names, instead of one
    request per name: a brace pattern over 10,000 S3 shards costs 10 list calls, not 10,000 HEADs.
    Local: one stat per name, through symlinks (a listing reports a linked file as no file).
    """
    by_parent: dict[str, list[str]] = {}
    for url in urls:
        by_parent.setdefault(url.rstrip("/").rsplit("/", 1)[0] if "/" in url else ".", []).append(url)
    found: dict[str, dict] = {}
    for parent, group in by_parent.items():
        if not storage.is_remote(parent):
            found.update((u, _local_file_info(storage.filesystem(u)[1])) for u in group)
            continue
        fs, path = storage.filesystem(parent)
        fs.invalidate_cache(path)  # s3fs caches listings: files made or changed since must be seen
        # A version of an object (`?versionId=`) is not in a listing of the current objects.
        single = {u for u in group if len(group) == 1 or VERSION_QUERY in u}
        for url in single:
            info = _remote_file_info(url)
            if info is not None:
                found[url] = info
        group = [u for u in group if u not in single]
        if not group:
            continue
        try:
            with storage.naming_url(parent):
                listing = {e["name"].rstrip("/"): e for e in fs.ls(path, detail=True)
                           if e["type"] == "file"}
        except (FileNotFoundError, NotADirectoryError):
            listing = {}
        for url in group:
            info = listing.get(storage.filesystem(url)[1].rstrip("/"))
            if info is not None:
                found[url] = info
    return {u: found.get(u) for u in urls}


VERSION_QUERY = "?versionId="  # s3fs's spelling of one version of an object


def _remote_file_info(url: str) -> dict | None:
    """The listing entry of a remote file; None when there is none (or a folder is there)."""
    fs, path = storage.filesystem(url)
    try:
        with storage.naming_url(url):
            info = fs.info(path)
    except (FileNotFoundError, NotADirectoryError):  # denied access or a dead endpoint: raised
        return None
    return info if info["type"] == "file" else None


def _local_file_info(path: str) -> dict | None:
    try:
        info = os.stat(path)
    except (OSError, ValueError):  # missing, a dangling link, a name the OS refuses
        return None
    return {"size": info.st_size, "mtime": info.st_mtime} if stat.S_ISREG(info.st_mode) else None

