"""Local paths and fsspec URLs (s3://, gs://, ...) behind one small set of helpers, one URL at a
time (url_listing.py lists many at once).

Write discipline used everywhere in bdt: a file is either complete or absent. Local files are
written under a temporary name in the same directory and renamed into place (rename is atomic
on POSIX); object stores only make an object visible once its upload has completed, so remote
files are written directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import posixpath
import re
import uuid
from typing import IO, Iterator

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from bdt.processes import WRITER_TAG_PATTERN, writer_gone, writer_tag

try:  # s3fs passes botocore's own errors on as they are: a dead endpoint's is no OSError
    from botocore.exceptions import BotoCoreError
except ImportError:  # installed without s3fs
    BotoCoreError = OSError
from safetensors import SafetensorError

try:
    from aiohttp import ClientConnectionError
except ImportError:
    ClientConnectionError = ConnectionError

log = logging.getLogger(__name__)
# What a storage call raises when the store fails it (I/O, network, the endpoint gone).
STORE_ERRORS = (OSError, BotoCoreError)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith(("file://", "local://"))  # fsspec's local protocols


# `s3:/bucket/x` or `gs:bucket/x`: a URL short of a '/', which fsspec and the OS take for a local
# folder named `s3:` (checkpoints and outputs written to the local disk instead of the bucket).
_SHORT_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):/?(?!/)")


def check_not_short_url(path: str) -> None:
    """ValueError for a path that starts like an fsspec URL whose '//' lacks a '/'."""
    short = _SHORT_URL.match(path)
    if short and short.group(1).lower() in fsspec.available_protocols() and \
            short.group(1).lower() not in ("file", "local"):
        raise ValueError(f"{path}: looks like a URL short of a '/' (write "
                         f"{short.group(1)}://...; a local folder of that name: ./{path})")


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = out + "/" + part.strip("/")
    return out


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for a URL. Call inside each worker process: s3fs is not fork-safe.

    ValueError for a remote URL with an empty path segment (`s3://b/runs//ck`): an object store
    keeps the `//` in its keys, but s3fs cannot list below it, so what bdt wrote there (its
    checkpoints, shards) could not be found again."""
    check_not_short_url(url)
    if is_remote(url) and "//" in url.split("://", 1)[1].rstrip("/"):
        raise ValueError(f"{url}: empty path segment ('//'); remove the extra '/'")
    if "::" in url:  # fsspec chains filesystems at '::' and would keep only the part before it
        if is_remote(url):
            raise ValueError(f"{url}: '::' in a URL (fsspec's filesystem chaining) is not "
                             f"supported; name the data without it")
        fs = LocalFileSystem()
        return fs, fs._strip_protocol(url)  # a local name may hold '::'; file:// is dropped
    fs, path = url_to_fs(url)
    if getattr(fs, "async_impl", False):
        _quiet_lost_connections(fs.loop)
    return fs, path


def _quiet_lost_connections(loop: asyncio.AbstractEventLoop) -> None:
    """When an endpoint dies mid-upload, aiohttp leaves a task holding the same connection error
    that the call itself raises; asyncio printed its traceback when the task was collected,
    beside bdt's one-line error. Only those go to the debug log; anything else as before."""
    if loop.get_exception_handler() is _lost_connection_handler:
        return
    loop.set_exception_handler(_lost_connection_handler)


def _lost_connection_handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    error = context.get("exception")
    if isinstance(error, (ConnectionError, ClientConnectionError)) \
            and "never retrieved" in context.get("message", ""):
        log.debug("a store connection was lost under a background task: %r", error)
        return
    loop.default_exception_handler(context)


def exists(url: str, doing: str = "") -> bool:
    """`doing`: what a store's error says was being done (naming_url)."""
    fs, path = filesystem(url)
    _forget_listing(fs, path)
    with naming_url(url, doing):
        return fs.exists(path)


def is_dir(url: str) -> bool:
    fs, path = filesystem(url)
    _forget_listing(fs, path)
    with naming_url(url):
        return fs.isdir(path)


def _forget_listing(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """s3fs keeps every listing it made, without expiry: a file another process wrote since
    would stay invisible to this one."""
    if not isinstance(fs, LocalFileSystem):
        fs.invalidate_cache(posixpath.dirname(path.rstrip("/")))


@contextlib.contextmanager
def naming_url(url: str, doing: str = "") -> Iterator[None]:
    """A store's error inside (STORE_ERRORS) is an OSError naming `url` and what was being
    done (`doing`, e.g. "uploading"): s3fs's say only "Forbidden" or "Access Denied", and
    botocore's (a dead endpoint) are no OSError and name no bdt object. Not found keeps its
    message (callers test for it). A library's error over an OS error (os_error_in) is one."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError):
        raise
    except STORE_ERRORS as e:
        raise _named_error(f"{doing} {url}" if doing else url, e) from e
    except Exception as e:  # a library's error over a failed write (a full disk): os_error_in
        cause = os_error_in(e)
        if cause is None:
            raise
        raise _named_error(f"{doing} {url}" if doing else url, cause) from e


# Rust's std::io::Error, passed on by safetensors (SafetensorError) and tokenizers (a plain
# Exception) in the message only: "No space left on device (os error 28)".
RUST_ERRORS = (SafetensorError, Exception)
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)$")


def os_error_in(e: BaseException) -> OSError | None:
    """The OS error a library's error `e` stands for, or None: torch.save's RuntimeError over
    the OSError of its file object's write, the Rust libraries' by its errno."""
    if isinstance(e, RuntimeError):
        return e.__context__ if isinstance(e.__context__, OSError) else None
    found = _RUST_OS_ERROR.search(str(e)) if type(e) in RUST_ERRORS else None
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def _named_error(where: str, e: BaseException) -> OSError:
    """`e`, a store's error, as an OSError whose message starts with `where`: an OSError keeps
    its type; botocore's (no OSError) become one, so that callers catching OSError see them."""
    try:
        if isinstance(e, OSError):
            return type(e)(f"{where}: {e}")
    except (KeyError, TypeError):  # botocore's errors (a timeout) take keyword arguments only
        pass
    return OSError(f"{where}: {type(e).__name__}: {e}")



def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    if not is_remote(url):
        try:
            fs.makedirs(path, exist_ok=True)
        except FileExistsError:  # a file in its place, or on the way to it
            raise NotADirectoryError(f"{path}: cannot make this directory, a file of that name "
                                     f"(or of a folder above it) is in the way") from None
    # Object stores have no directories; the bucket must exist and is checked by the first write.


@contextlib.contextmanager
def open_atomic(url: str) -> Iterator[IO[bytes]]:
    """Open `url` for binary writing so that it appears only once fully written.

    On an exception inside the block, the partial local temp file is removed and nothing appears.
    Temps of `url` that killed writers left go first (remove_stale_temps): a kill mid-write
    leaves one that no later write of the name would ever remove otherwise.
    """
    if is_remote(url):
        fs, path = filesystem(url)
        # fs.open, not fsspec.open: that one makes missing parents, and for s3fs a parent is a
        # bucket: a mistyped bucket name would be created instead of refused.
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException as e:
            # Closing would complete the upload of a partial object; discard aborts it instead.
            discard = getattr(f, "discard", None)
            if discard is None:
                f.close()
                with contextlib.suppress(Exception):
                    fs.rm(path)
            else:
                discard()
                f.closed = True  # discarded: nothing left to flush when the object is collected
            if isinstance(e, BotoCoreError):  # a part uploaded by a write, lost on every retry
                raise _named_error(f"cannot write {url}", e) from e
            raise
        try:
            f.close()  # the upload (its last part, or all of a small file)
        except STORE_ERRORS as e:  # s3fs's errors do not say which object
            raise _named_error(f"cannot write {url}", e) from e
        return
    path = local_path(url)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_path(path)
    f = open(tmp, "wb")
    try:
        yield f
        with naming_url(url, "writing"):  # a full disk: which file
            f.flush()
            os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a failed write's buffer: it would hide the error
            f.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# A local temp file `.NAME.tmp-PID-STARTMS-HOST-RANDOM` names its writer (pid, process start in
# ms, a hash of the host name, which keeps the name short), so that a killed writer's temp can be
# told from a live one's. `.NAME.tmp-RANDOM` and `NAME.RANDOM32.tmp` name none: bdt wrote those
# before temps carried their writer, and they are deleted as stale.
TEMP_NAME = re.compile(rf"\.(?P<name>.+)\.tmp-(?:{WRITER_TAG_PATTERN}-)?[0-9a-f]{{8}}"
                       r"|(?P<visible_name>.+)\.[0-9a-f]{32}\.tmp")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of bdt's temp files (open_atomic's, create_exclusive's)."""
    return TEMP_NAME.fullmatch(name) is not None


def _temp_path(path: str) -> str:
    directory, name = os.path.split(local_path(path))
    return os.path.join(directory, f".{name}.tmp-{writer_tag()}-{uuid.uuid4().hex[:8]}")


def local_path(url: str) -> str:
    """The absolute OS path of a local name or file:// (local://) URL, as fsspec reads it: `~` expanded,
    `file:` dropped, `..` left to the OS (through a link, as the kernel resolves it). Writing
    the name as given put `~/x` or `file:/x` in a folder of that name that no read looked in."""
    return LocalFileSystem._strip_protocol(url)


def real_local_path(url: str) -> str:
    """The one name of a local file or folder however it is spelled (relative, `~`, `file://`,
    `./`, `..`, links): local_path's, links resolved. ValueError for a URL short of a '/'."""
    check_not_short_url(url)
    return os.path.realpath(local_path(url))


def remove_stale_temps(url: str) -> None:
    """Delete the temp files of `url` that killed writers left: those whose writer process on
    this host has ended. A live writer's temp, or another host's (whose processes this host
    cannot see), stays, so no lock is needed: `bdt data shapes` writes its shards holding none,
    and a killed extraction's Ray workers can outlive its lock. Nothing to do for a remote URL,
    where nothing partial is ever visible."""
    if is_remote(url):
        return
    directory, name = os.path.split(local_path(url))
    try:
        entries = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if not entry.startswith((f".{name}.tmp-", f"{name}.")):  # cheap, in a folder of 10k shards
            continue
        m = TEMP_NAME.fullmatch(entry)
        if m is None or name not in (m["name"], m["visible_name"]):
            continue
        if m["pid"] is not None and not writer_gone(m["pid"], m["started_ms"], m["host"]):
            continue  # its writer runs, or ran on another host
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, entry))


def write_bytes_atomic(url: str, data: bytes) -> None:
    with open_atomic(url) as f, naming_url(url, "writing"):
        f.write(data)


def read_bytes(url: str, doing: str = "") -> bytes:
    fs, path = filesystem(url)
    _forget_listing(fs, path)
    with naming_url(url, doing), fs.open(path, "rb") as f:
        return f.read()


def read_lines(url: str, doing: str = "") -> Iterator[bytes]:
    """The lines of a file (b"\n" kept), read as they are consumed: for one too large to hold.
    A store's error while reading names `url`; the consumer's own errors stay its own. Read in
    MiB pieces: fsspec's own line iterator reads a whole block (5 MB on S3) for every line."""
    fs, path = filesystem(url)
    _forget_listing(fs, path)
    with naming_url(url, doing), fs.open(path, "rb") as f:
        rest = b""
        while chunk := f.read(1 << 20):
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                yield line + b"\n"
        if rest:
            yield rest


def sha256(url: str, doing: str = "") -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file, streamed."""
    h = hashlib.sha256()
    size = 0
    fs, path = filesystem(url)
    _forget_listing(fs, path)
    with naming_url(url, doing), fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


WRITE_PROBE_PREFIX = ".bdt-write-probe-"  # check_writable's probe (a kill can leave it, or its temp)


def check_writable(url: str) -> None:
    """Fail early, before any work, when `url` cannot be written (a probe file is written and removed).

    Raises OSError with a message naming the destination.
    """
    probe = join(url, f"{WRITE_PROBE_PREFIX}{uuid.uuid4().hex[:8]}")
    try:
        makedirs(url)
        write_bytes_atomic(probe, b"")
        fs, path = filesystem(probe)
        fs.rm(path)
    except Exception as exc:  # permission, missing bucket, read-only fs, bad credentials...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"cannot write to {url}: {reason}") from None


_CREATE_TRIES = 3  # an object store's name that keeps being taken and let go between two calls


def create_exclusive(url: str, data: bytes) -> bool:
    """Create `url` holding `data`, or return False when it exists; it never appears without its
    content. Local: a temporary file (open_atomic's naming) hard-linked to the name (the link fails
    when the name exists, on local filesystems and NFS alike); temps of `url` that killed writers
    left are deleted first (remove_stale_temps). Object store: a conditional put (If-None-Match,
    fsspec's mode "xb"). `data` must be this writer's own (a token, its pid): an object holding
    exactly `data` is taken for this call's; one removed before it could be read back (its holder
    let go) leaves the name free, and the create is tried again. A store's error is an OSError
    naming `url`."""
    if is_remote(url):
        fs, path = filesystem(url)
        with naming_url(url, "creating"):
            for _ in range(_CREATE_TRIES):
                try:
                    with fs.open(path, "xb") as f:
                        f.write(data)
                    return True
                except FileExistsError:
                    pass
                # The store may have kept a put whose answer the connection lost: botocore's
                # retry of it then met this very object. Gone again: its holder let it go.
                with contextlib.suppress(FileNotFoundError):
                    return fs.cat_file(path) == data
            return False  # taken and let go each time: as good as taken
    path = local_path(url)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_temps(path)  # a writer killed before it unlinked its temp
    tmp = _temp_path(path)
    try:  # the temporary file goes also when writing it fails (a full disk)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):  # open() itself failed
            os.unlink(tmp)
