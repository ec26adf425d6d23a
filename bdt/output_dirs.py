"""Output directories a command fills in one go (`bdt eval --out`, `bdt sample --out`, exports):
refused when they already hold something, written through a staging folder, and completed by
one rename per entry with the caller's completion marker last, so that a kill at any moment
leaves either the old output or the whole new one (or a half move the next writer undoes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import tempfile
from typing import Iterator

from bdt import storage

log = logging.getLogger(__name__)

STAGING_NAME = ".bdt-staging"  # staged_dir's folder inside an existing output directory
# In that folder while its entries move out: their names. A kill mid-move leaves a half output
# that the next writer there takes back out (`_undo_interrupted_move`), so it starts as before.
MOVING_NAME = ".bdt-moving.json"


def refuse_nonempty_dir(path: str, hint: str = "", overwrite: bool = False) -> None:
    """FileExistsError unless `path` is absent or an empty directory (a staging folder a killed
    `staged_dir` left counts as empty), or with `overwrite` any directory; `hint` says what to do
    instead. A new `path` must be creatable (OSError otherwise, so that a command fails before
    its work, not after): locally its nearest existing ancestor a writable directory, on an
    object store its bucket present and taking a write."""
    if not path:
        raise ValueError("the output directory is '': give a directory (`.` for this one)")
    storage.check_not_short_url(path)
    if storage.is_remote(path):
        _refuse_nonempty_remote(path, hint, overwrite)
        return
    if not os.path.lexists(path):
        ancestor = os.path.dirname(os.path.abspath(path))
        while not os.path.lexists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
            why = "not a directory" if not os.path.isdir(ancestor) else "not writable"
            raise OSError(f"cannot create {path}: {ancestor} is {why}")
        return
    if os.path.isdir(path):
        _undo_interrupted_move(os.path.realpath(path))
    if os.path.isdir(path) and (overwrite or set(os.listdir(path)) <= {STAGING_NAME}):
        return
    what = "exists and is not empty" if os.path.isdir(path) else "exists and is not a directory"
    raise FileExistsError(f"{path} {what}" + (f": {hint}" if hint else ""))


OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs")  # URLs whose first part is a bucket


def _refuse_nonempty_remote(url: str, hint: str, overwrite: bool) -> None:
    """As refuse_nonempty_dir; the destination must also take a write (a probe object), since
    a read-only bucket or credentials that may only read would fail the upload after the work."""
    fs, root = storage.filesystem(url)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    bucket = root.strip("/").split("/", 1)[0]
    with storage.naming_url(url):
        is_file = fs.isfile(root)
        is_dir = not is_file and fs.isdir(root)
        nonempty = is_dir and not overwrite and bool(fs.ls(root, detail=False))
        no_bucket = (not (is_file or is_dir) and bool(set(protocols) & set(OBJECT_STORES))
                     and not fs.exists(bucket))
    if is_file:
        raise FileExistsError(f"{url} exists and is not a directory")
    if nonempty:
        raise FileExistsError(f"{url} exists and is not empty" + (f": {hint}" if hint else ""))
    if no_bucket:
        raise OSError(f"cannot create {url}: bucket {bucket!r} does not exist")
    storage.check_writable(url)


@contextlib.contextmanager
def staged_dir(path: str, overwrite: bool = False, last: str = "") -> Iterator[str]:
    """A directory written in one go: yields a local staging folder to write into and moves what
    it holds to `path` when the block ends; an exception removes it and leaves `path` as it was.
    A new local `path` appears whole (one rename of `.NAME.bdt-staging` beside it). An existing
    one, which must be empty unless `overwrite`, stays the same directory (its permissions, a
    volume mounted there, a shell inside it) and takes each entry from `path/.bdt-staging` by one
    rename, replacing the entry of that name; others stay; `last` (a completion marker the
    caller's readers check, e.g. eval.json) moves after the rest. A kill during those renames is
    undone by the next writer there (refuse_nonempty_dir). A link is followed to its folder.
    A remote `path` is staged under the system temp dir and uploaded once the block ends (an
    object store has no rename: a crash during the upload leaves part of it there, without
    `last`, which is removed first and uploaded last)."""
    refuse_nonempty_dir(path, overwrite=overwrite)
    if storage.is_remote(path):
        with _staged_remote(path, last) as tmp:
            yield tmp
        return
    final = os.path.realpath(path)  # through a link, to the folder it names
    if os.path.isdir(final):
        tmp = os.path.join(final, STAGING_NAME)
    else:
        parent, name = os.path.split(final)
        tmp = os.path.join(parent, f".{name}.bdt-staging")
    _remove_stale_staging(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
        readable_as_open_makes(tmp)
        if not os.path.lexists(final):
            os.replace(tmp, final)
            return
        names = sorted(os.listdir(tmp), key=lambda n: (n == last, n))
        storage.write_bytes_atomic(os.path.join(tmp, MOVING_NAME), json.dumps(names).encode())
        for name in names:
            source, target = os.path.join(tmp, name), os.path.join(final, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.isdir(source) and os.path.lexists(target):
                os.remove(target)
            os.replace(source, target)
        os.remove(os.path.join(tmp, MOVING_NAME))
        os.rmdir(tmp)
    except BaseException:
        _undo_interrupted_move(final)  # a failed rename: what moved goes back out
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def readable_as_open_makes(folder: str) -> None:
    """Give every file under `folder` the mode open() gives a new file (0666 less the umask):
    safetensors writes its files 0600, so an export or init-tiny model was unreadable to the
    rest of a cluster's group, unlike every other file of the same folder."""
    mode = 0o666 & ~_umask()
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path) and stat.S_IMODE(os.lstat(path).st_mode) != mode:
                os.chmod(path, mode)


def _umask() -> int:
    """The process umask, read from /proc where the kernel shows it: setting it to read it back
    would change it for other threads creating files at that moment."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _staged_remote(url: str, last: str) -> Iterator[str]:
    """Each entry replaces its namesake whole, as locally. `last` goes first (an old marker
    beside half a new output would pass it for complete) and comes back last."""
    tmp = tempfile.mkdtemp(prefix="bdt-staging-")
    try:
        yield tmp
        fs, root = storage.filesystem(url)
        root = root.rstrip("/")
        names = sorted(os.listdir(tmp), key=lambda n: (n == last, n))
        for name in reversed(names):
            if fs.exists(f"{root}/{name}"):
                fs.rm(f"{root}/{name}", recursive=True)
        for name in names:
            source = os.path.join(tmp, name)
            if os.path.isdir(source):
                fs.put(source + "/", f"{root}/{name}", recursive=True)  # '/': its contents
            else:
                fs.put_file(source, f"{root}/{name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _undo_interrupted_move(final: str) -> None:
    """Remove what a killed staged_dir had moved into `final` (the entries its record names that
    left the staging folder), then the folder: `final` is as before that write, less any entry
    of the same name it replaced."""
    staging = os.path.join(final, STAGING_NAME)
    record = os.path.join(staging, MOVING_NAME)
    if os.path.islink(staging) or not os.path.isfile(record):
        return
    try:
        names = json.loads(storage.read_bytes(record))
    except ValueError:  # torn: the record is written atomically, so not by bdt
        return
    moved = [n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")
             and not os.path.lexists(os.path.join(staging, n))
             and os.path.lexists(os.path.join(final, n))]
    for name in moved:
        target = os.path.join(final, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        else:
            os.remove(target)
    shutil.rmtree(staging)
    log.warning("%s: removed the partial output of an interrupted write (%d of %d entries had "
                "been moved in)", final, len(moved), len(names))


def _remove_stale_staging(tmp: str) -> None:
    """A killed attempt's staging folder is deleted; anything else of that name (a link, a file)
    is not bdt's to delete."""
    if os.path.islink(tmp) or (os.path.lexists(tmp) and not os.path.isdir(tmp)):
        raise FileExistsError(f"{tmp} is in the way of the staging folder and is not one: "
                              f"move it away")
    shutil.rmtree(tmp, ignore_errors=True)
