"""The one shard writer of bdt (the reader: tars.py).

`ShardWriter` writes a tar (webdataset's TarWriter, members as given) that appears only
once complete, hashing it on the way; member metadata is fixed (mtime 0, owner bdt), so the same
samples give the same bytes. A remote tar is spooled in the temp folder and uploaded whole; the
spools of writers killed on a machine are deleted by the next process writing there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from bdt import storage
from bdt.processes import WRITER_TAG_PATTERN, writer_gone, writer_tag


class _HashingFile:
    """Write-through wrapper counting and hashing the bytes (tar streams only write); a failed
    write (a full disk) names `url`."""

    def __init__(self, f: IO[bytes], url: str):
        self.f, self.url, self.sha, self.size = f, url, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        with storage.naming_url(self.url, "writing"):
            return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


_SPOOL_NAME = re.compile(rf"bdt-shard-{WRITER_TAG_PATTERN}-\w*\.part")
_swept_spools = False


def _spool_prefix() -> str:
    """Spool names carry their writer: one killed by SIGKILL cannot delete its spool, so each
    process deletes those of dead writers on its machine before its first spool."""
    global _swept_spools
    if not _swept_spools:
        _swept_spools = True
        for name in os.listdir(tempfile.gettempdir()):
            m = _SPOOL_NAME.fullmatch(name)
            if m and writer_gone(m["pid"], m["started_ms"], m["host"]):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(tempfile.gettempdir(), name))
    return f"bdt-shard-{writer_tag()}-"


@contextlib.contextmanager
def _open_output(url: str) -> Iterator[IO[bytes]]:
    """Local: temp + rename (storage.open_atomic). Remote: spooled to a local temp file and
    uploaded once complete, so a failed write never leaves a partial object behind."""
    if not storage.is_remote(url):
        with storage.open_atomic(url) as f:
            yield f
        return
    with tempfile.NamedTemporaryFile(prefix=_spool_prefix(), suffix=".part") as tmp:
        yield tmp
        tmp.flush()
        fs, path = storage.filesystem(url)
        fs.put_file(tmp.name, path)


class ShardWriter:
    """`with ShardWriter(url) as w: w.write(sample)`: a webdataset tar of samples (dicts of
    extension -> bytes plus __key__, written as given), visible at `url` only once closed
    without error; `count`, `size` and `sha256` describe it then."""

    def __init__(self, url: str):
        self.url, self.count, self.size, self.sha256 = url, 0, 0, ""
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ShardWriter:
        import webdataset as wds

        with self._stack as stack:
            out = stack.enter_context(_open_output(self.url))
            # a full temp dir is the machine's, not the store's
            where = f"{self.url} (spooled in {out.name})" if storage.is_remote(self.url) else self.url
            self._out = _HashingFile(out, where)
            # Fixed member metadata (mtime, owner): the same samples give byte-identical tars,
            # so a rerun (re-extracting an input, regenerating a dataset) reproduces its files.
            self._tar = stack.enter_context(wds.TarWriter(self._out, encoder=False, mtime=0.0,
                                                          user="bdt", group="bdt"))
            self._stack = stack.pop_all()
        return self

    def write(self, sample: dict[str, Any]) -> None:
        self._tar.write(sample)
        self.count += 1

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)
        self.size, self.sha256 = self._out.size, self._out.sha.hexdigest()
