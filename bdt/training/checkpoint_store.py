"""Where checkpoints live: naming and listing the step directories under a root, copying a
directory to and from a remote root (s3://...), and deleting one marker-first.

CheckpointManager (checkpoint.py) decides when each happens; these functions only move files.
"""

from __future__ import annotations

import logging
import os
import re

from fsspec.implementations.local import LocalFileSystem

from bdt import storage
from bdt.training import integrity
from bdt.training.integrity import MARKER

log = logging.getLogger(__name__)
_TAG_RE = re.compile(r"^step_(\d{9})$")


def tag_for(step: int) -> str:
    return f"step_{step:09d}"


def list_checkpoints(root: str) -> list[tuple[int, str, bool]]:
    """(step, tag, complete) for every checkpoint directory under `root`, oldest first."""
    fs, path = storage.filesystem(root.rstrip("/"))
    fs.invalidate_cache()  # listings are cached by s3fs; other ranks/processes write here
    out = []
    with storage.naming_url(root, "listing checkpoints in"):
        if not fs.exists(path):
            return []
        for entry in fs.ls(path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            match = _TAG_RE.match(name)
            if match:
                out.append((int(match.group(1)), name, fs.exists(f"{path}/{name}/{MARKER}")))
    return sorted(out)


def upload_dir(local_dir: str, remote_dir: str) -> None:
    fs, _ = storage.filesystem(remote_dir)
    for dirpath, _, files in os.walk(local_dir):
        for fname in files:
            src = os.path.join(dirpath, fname)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            fs.put_file(src, storage.filesystem(storage.join(remote_dir, rel))[1])


def check_uploaded(remote_dir: str, files: dict) -> None:
    """The marker may only name files the store holds: an upload that lost some (a staging
    folder emptied under it) must fail here, not publish a checkpoint of nothing."""
    fs, path = storage.filesystem(remote_dir)
    fs.invalidate_cache(path)
    there = {p[len(path.rstrip("/")) + 1:] for p in fs.find(path)}
    missing = sorted(set(files) - there)
    if missing:
        raise OSError(f"checkpoint {remote_dir}: {len(missing)} file(s) did not reach the "
                      f"store ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                      f"no marker written, so the checkpoint stays incomplete")


def download_dir(remote_dir: str, local_dir: str, skip: set[str] = frozenset()) -> None:
    """Every object under `remote_dir` into `local_dir`, less the top-level folders in `skip`
    and any whose key would land outside `local_dir`."""
    fs, path = storage.filesystem(remote_dir)
    fs.invalidate_cache()
    with storage.naming_url(remote_dir, "downloading checkpoint"):
        for src in fs.find(path):
            rel = src[len(path):].lstrip("/")
            if rel.split("/", 1)[0] in skip:
                continue
            if integrity.unsafe_name(rel):  # its key would place it outside local_dir: not fetched
                log.warning("checkpoint %s: object %r not downloaded: %s", remote_dir, src,
                            integrity.unsafe_name(rel))
                continue
            dst = os.path.join(local_dir, *rel.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            fs.get_file(src, dst)


def remove_checkpoint_dir(fs, path: str) -> None:
    """Delete a checkpoint directory, its marker first: a kill midway then leaves an incomplete
    directory (pruned by the next save), never one that reads as complete with files missing.
    A symlink (a checkpoint linked in from another root) loses only itself: the marker through it
    is the other root's, whose own pruning would then delete that checkpoint as incomplete."""
    if isinstance(fs, LocalFileSystem) and os.path.islink(path):
        os.unlink(path)
        return
    if fs.exists(f"{path}/{MARKER}"):
        fs.rm(f"{path}/{MARKER}")
    fs.rm(path, recursive=True)
