"""Output directories a command fills in one go (`bdt eval --out`, `bdt sample --out`, exports):
refused when they already hold something, written through a staging folder, and completed by
one rename per entry with the caller's completion marker last, so that a kill at any moment
leaves either the old output or the whole new one (or a half move the next writer undoes).
A local folder copied into one (an image tokenizer, an LLM) may link only to files of its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from typing import Iterator

from bdt import storage
from bdt.processes import WRITER_TAG_PATTERN, host_tag, writer_gone, writer_tag

log = logging.getLogger(__name__)

# staged_dir's folder: STAGING_NAME-TAG inside an existing output directory, .NAME.bdt-staging-TAG
# beside a new one, TAG naming its writer (processes.writer_tag). A live writer's folder keeps
# other writers out of the directory; a killed one's is removed. Untagged: an earlier bdt's.
STAGING_NAME = ".bdt-staging"
# In that folder while its entries move out: their names. A kill mid-move leaves a half output
# that the next writer there takes back out (`_undo_interrupted_move`), so it starts as before.
MOVING_NAME = ".bdt-moving.json"


def refuse_nonempty_dir(path: str, hint: str = "", overwrite: bool = False) -> None:
    """FileExistsError unless `path` is absent or an empty directory (a staging folder a killed
    `staged_dir` left counts as empty, and goes), or with `overwrite` any directory; `hint` says
    what to do instead. Locally also while another process's staged_dir writes `path`. A new
    `path` must be creatable (OSError otherwise, so that a command fails before its work, not
    after): locally its nearest existing ancestor a writable directory, on an object store its
    bucket present and taking a write."""
    if not path:
        raise ValueError("the output directory is '': give a directory (`.` for this one)")
    storage.check_not_short_url(path)
    if storage.is_remote(path):
        _refuse_nonempty_remote(path, hint, overwrite)
        return
    _refuse_nonempty_local(storage.local_path(path), hint, overwrite)


def _refuse_nonempty_local(path: str, hint: str, overwrite: bool, mine: str = "") -> None:
    """refuse_nonempty_dir of a local `path`; `mine`: the caller's own staging folder."""
    final = os.path.realpath(path)  # through a link, to the folder it names
    for staging, writer in _staging_folders(final):
        if staging == mine:
            continue
        if writer is not None and not writer_gone(*writer):
            where = f"pid {writer[0]}" if writer[2] == host_tag() else "on another host"
            raise FileExistsError(f"{path} is being written by another bdt process ({where}): "
                                  f"wait for it to end or give another directory (if that "
                                  f"process is gone, delete its staging folder {staging})")
        _remove_stale_staging(final, staging)
    if not os.path.lexists(path):
        ancestor = os.path.dirname(os.path.abspath(path))
        while not os.path.lexists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
            why = "not a directory" if not os.path.isdir(ancestor) else "not writable"
            raise OSError(f"cannot create {path}: {ancestor} is {why}")
        return
    if os.path.isdir(path) and (overwrite or not [
            n for n in os.listdir(path) if os.path.join(final, n) != mine]):
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
    if not bucket and set(protocols) & set(OBJECT_STORES):  # the whole store: its buckets
        raise ValueError(f"{url} names no bucket: give s3://BUCKET/FOLDER")
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
    A new local `path` appears whole (one rename of `.NAME.bdt-staging-TAG` beside it). An
    existing one, which must be empty unless `overwrite`, stays the same directory (its
    permissions, a volume mounted there, a shell inside it) and takes each entry from
    `path/.bdt-staging-TAG` by one rename, replacing the entry of that name; others stay; `last`
    (a completion marker the caller's readers check, e.g. eval.json) moves after the rest. A
    kill during those renames is undone by the next writer there (refuse_nonempty_dir). A link
    is followed to its folder. One writer at a time: a second process's staged_dir of the same
    local `path` fails at its start (FileExistsError naming it) while the first one's staging
    folder is there, and the emptiness check is repeated once this one's exists, so that an
    output another process completed meanwhile is not replaced without `overwrite`.
    A remote `path` is staged under the system temp dir and uploaded once the block ends (an
    object store has no rename: a crash during the upload leaves part of it there, without
    `last`, which is removed first and uploaded last). Writers of one remote `path` are not
    kept apart (no process there to check): the later upload replaces the earlier's entries."""
    refuse_nonempty_dir(path, overwrite=overwrite)
    if storage.is_remote(path):
        with _staged_remote(path, last) as tmp:
            yield tmp
        return
    path = storage.local_path(path)  # `~/out`, `file:///out`: where readers of the name look
    final = os.path.realpath(path)  # through a link, to the folder it names
    if os.path.isdir(final):
        tmp = os.path.join(final, f"{STAGING_NAME}-{writer_tag()}")
    else:
        parent, name = os.path.split(final)
        tmp = os.path.join(parent, f".{name}{STAGING_NAME}-{writer_tag()}")
    os.makedirs(tmp)
    try:
        # Made first, checked after: of two writers starting at once, at least one sees the other's.
        _refuse_nonempty_local(path, "", overwrite, mine=tmp)
        with storage.naming_url(path, "writing"):  # a full disk: which output
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
        _remove_stale_staging(final, tmp)  # a failed rename: what moved goes back out
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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_links(folder: str, what: str, weights_may_link: bool = False) -> None:
    """ValueError naming the first symlink in local `folder` that does not lead to a regular file
    inside it (or, in a Hugging Face cache snapshot `<repo>/snapshots/<rev>`, inside
    `<repo>/blobs`): the folder is copied into an output a user may publish, and a cloned one
    with `notes.txt -> ~/.ssh/id_rsa` put that key there. `what` names the folder (a config key).
    `weights_may_link`: weight files (WEIGHT_SUFFIXES) may lead anywhere, for a folder whose
    weights are parsed as tensors and never copied as bytes (a shared store of weights is often
    linked in). Remote folders hold no links."""
    if not folder or storage.is_remote(folder) or not os.path.isdir(storage.local_path(folder)):
        return
    root = storage.local_path(folder)
    real = os.path.realpath(root)
    allowed = [real]
    blobs = os.path.join(os.path.dirname(os.path.dirname(real)), "blobs")
    if os.path.basename(os.path.dirname(real)) == "snapshots" and os.path.isdir(blobs):
        allowed.append(os.path.realpath(blobs))
    for dirpath, dirs, files in os.walk(root):  # links to folders are listed, not entered
        for name in sorted(dirs + files):
            path = os.path.join(dirpath, name)
            if not os.path.islink(path) or (weights_may_link and name.endswith(WEIGHT_SUFFIXES)):
                continue
            try:
                target = os.path.realpath(path, strict=True)
            except OSError:  # missing, or a loop
                problem = "which leads nowhere"
            else:
                inside = any(os.path.commonpath([a, target]) == a for a in allowed)
                problem = ("" if inside and os.path.isfile(target) else "not a file" if inside
                           else "outside the folder")
            if problem:
                raise ValueError(
                    f"{what} = {folder}: {os.path.relpath(path, root)} is a symlink to "
                    f"{os.readlink(path)}, {problem}: its files go into an output that may be "
                    f"published, so its links must lead to its own files (or a Hugging Face "
                    f"snapshot's blobs/); put the file itself there")


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


# A remote output's staging folder in the system temp dir: REMOTE_STAGING-TAG-RANDOM, TAG naming
# its writer, so that the folder a SIGKILLed writer left (images: it can be large) is removed by
# the next one (`_remove_dead_remote_staging`). One of another name (untagged: an older bdt's,
# or not bdt's at all) is left alone.
REMOTE_STAGING = "bdt-staging"
_REMOTE_STAGING_NAME = re.compile(rf"{REMOTE_STAGING}-{WRITER_TAG_PATTERN}-\w+")


def _remove_dead_remote_staging(temp_dir: str) -> None:
    """Remove the remote-output staging folders in `temp_dir` whose writer ran on this host and
    is gone (its pid absent, or now another process's). A live writer's, another host's (this
    host cannot see its processes), a link or a folder of another user stays."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(temp_dir):
            m = _REMOTE_STAGING_NAME.fullmatch(entry)
            if not m or not writer_gone(m["pid"], m["started_ms"], m["host"]):
                continue
            folder = os.path.join(temp_dir, entry)
            with contextlib.suppress(OSError):
                info = os.lstat(folder)
                if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
                    shutil.rmtree(folder, ignore_errors=True)
                    log.info("removed %s, the staging folder of a writer that was killed", folder)


@contextlib.contextmanager
def _staged_remote(url: str, last: str) -> Iterator[str]:
    """Each entry replaces its namesake whole, as locally. `last` goes first (an old marker
    beside half a new output would pass it for complete) and comes back last."""
    _remove_dead_remote_staging(tempfile.gettempdir())
    tmp = tempfile.mkdtemp(prefix=f"{REMOTE_STAGING}-{writer_tag()}-")
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


def _staging_folders(final: str) -> list[tuple[str, tuple[str, str, str] | None]]:
    """The staging folders of output directory `final`, beside and inside it, each with its
    writer's (pid, start ms, host), None for an untagged one. A link or file of such a name is
    not bdt's: it is neither one nor removed (inside `final`, it counts as content)."""
    parent, name = os.path.split(final)
    found = []
    for folder, prefix in ((parent, f".{name}{STAGING_NAME}"), (final, STAGING_NAME)):
        pattern = re.compile(rf"{re.escape(prefix)}(?:-{WRITER_TAG_PATTERN})?")
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.listdir(folder):
                m = pattern.fullmatch(entry)
                staging = os.path.join(folder, entry)
                if m and os.path.isdir(staging) and not os.path.islink(staging):
                    found.append((staging, m.group("pid", "started_ms", "host")
                                  if m["pid"] else None))
    return found


def _remove_stale_staging(final: str, staging: str) -> None:
    """A killed writer's staging folder goes, after what it had moved into `final` went back out
    (`final` is then as before that write, less any entry of the same name it replaced)."""
    _undo_interrupted_move(final, staging)
    shutil.rmtree(staging, ignore_errors=True)


def _undo_interrupted_move(final: str, staging: str) -> None:
    """Remove what a killed staged_dir had moved into `final` from `staging` (the entries its
    record names that left the staging folder)."""
    record = os.path.join(staging, MOVING_NAME)
    if not os.path.isfile(record):
        return
    try:
        names = json.loads(storage.read_bytes(record))
    except ValueError:  # torn: the record is written atomically, so not by bdt
        return
    moved = [n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")
             and not os.path.lexists(os.path.join(staging, n))
             and os.path.lexists(os.path.join(final, n))]
    for name in moved:  # two writers starting at once may both undo it: gone already is fine
        target = os.path.join(final, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(target)
    shutil.rmtree(staging, ignore_errors=True)
    log.warning("%s: removed the partial output of an interrupted write (%d of %d entries had "
                "been moved in)", final, len(moved), len(names))
