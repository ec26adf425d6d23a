"""Checkpoints: DeepSpeed engine state + our per-rank state + a completion marker written last.

Layout of one checkpoint (`<root>/step_000001234/`):
  <engine name>/...            DeepSpeed `save_checkpoint` output (all ranks call it)
  rank_00000.json|.safetensors per-rank state: step, counters, data-stream position, RNG states
                               (DeepSpeed writes `client_state` only on data-parallel rank 0 under
                               ZeRO-1/2, so each rank needs its own file; environment.md)
  shared.pt                    replicated non-engine state (EMA weights, a plain torch optimizer),
                               written by rank 0, read back with torch.load(weights_only=True)
  COMPLETE                     written by rank 0 after every other file: step, world size, the
                               engine settings (ZeRO stage, precision: another is refused by
                               name) and each file's size and sha256 (integrity.py), hashed by
                               its writer.
A checkpoint without COMPLETE (a crash or kill mid-save) is ignored by resume and pruned later;
pruning deletes a checkpoint's COMPLETE before its files, so a kill mid-prune leaves one such.

Resume (verifying and loading one, on the same or another number of ranks) is
checkpoint_load.py's. A checkpoint it passed over is never deleted: pruning only looks at
checkpoints up to the step just saved, and a save whose step already holds a complete checkpoint
(one resume passed over) first moves that one to `<root>/unusable/`.

For a remote root (s3://...) every node saves into a local staging directory, its local rank 0
uploads what the node wrote, and the marker is uploaded after a barrier, so it is again last
(checkpoint_store.py lists, copies and deletes the directories).

A trainer binds its manager to its run first (`bind`): the root's owner.json names one run, and
another is refused before it reads or writes anything there (checkpoint_owner.py). Readers
(sampling, export-only, the resume wrapper) do not bind.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from bdt import storage
from bdt.training import integrity
from bdt.training.checkpoint_load import SHARED_FILE, CheckpointLoader
from bdt.training.checkpoint_owner import CheckpointRootTaken, claim, owner_change
from bdt.training.checkpoint_store import (check_uploaded, list_checkpoints, remove_checkpoint_dir,
                                            tag_for, upload_dir)
from bdt.training.distributed import DistInfo, all_gather_object, barrier, broadcast_object
from bdt.training.integrity import MARKER
from bdt.training.patient_barrier import patient_barrier
from bdt.training.rank_state import capture_rng, write_rank_files

log = logging.getLogger(__name__)
UNUSABLE_DIR = "unusable"


class CheckpointManager(CheckpointLoader):
    """Save / find / verify / load checkpoints under `root` (local path or fsspec URL)."""

    def __init__(self, root: str, dist: DistInfo, keep_last: int = 3, staging_dir: str | None = None,
                 settings: dict[str, Any] | None = None,
                 versions: dict[str, tuple[int, str]] | None = None):
        """`settings`: what the engines' files depend on (e.g. ZeRO stage, precision), recorded in
        each marker; loading a checkpoint written with others is a ValueError naming them.
        `versions`: name -> (this bdt's version, what another one changes) of code the training
        depends on (e.g. the image decoding), recorded with the settings; a checkpoint of another
        version, or one recorded before the name was (version 1), is refused naming both."""
        self.root = root.rstrip("/")
        self.dist = dist
        self.keep_last = keep_last
        self.versions = versions or {}
        self.settings = {**(settings or {}), **{k: v for k, (v, _) in self.versions.items()}}
        self.passed_over: set[str] = set()  # tags resume found unusable: kept, never counted
        self.remote = storage.is_remote(self.root)
        self.own_staging = self.remote and not staging_dir  # bdt's folder: removed once empty
        if self.remote:
            # One folder per root: s3://b/exp-1 and s3://b/exp_1 read alike once sanitised, and two
            # runs staging into one folder delete each other's files before upload.
            name = (re.sub(r"[^A-Za-z0-9]+", "_", self.root)[-60:] + "-"
                    + hashlib.sha256(self.root.encode()).hexdigest()[:12])
            self.staging = staging_dir or os.path.join(tempfile.gettempdir(), "bdt-ckpt-staging", name)
        else:
            self.staging = self.root
        if glob.has_magic(self.staging):  # DeepSpeed finds a checkpoint's files by glob
            raise ValueError(f"checkpoint directory {self.staging!r} (run_dir, checkpoint.dir or "
                             f"checkpoint.staging_dir) holds '*', '?' or '[': DeepSpeed's glob "
                             f"would not find the checkpoint's files in it; rename it")
        self._share: tuple[int, int] | None = None  # (index, count) of this rank's file checks
        self.bound = False  # to a run (bind): each save first checks the root is still its
        self.run_id: str | None = None  # that run's id, on global rank 0

    # ---- ownership -------------------------------------------------------------------------
    def bind(self, run_dir: str, adopt: str = "") -> None:
        """Collective, before anything under root is read or written: make root the run's of
        `run_dir` (checkpoint_owner.py). Every rank raises rank 0's error: CheckpointRootTaken
        naming both runs when another run owns root and `adopt` is not its id."""
        error = None
        if self.dist.is_main:
            try:
                # A missing bucket or read-only credentials: refused now, not at the first save
                # (the probe object is gone again before anything else is read or written).
                storage.check_writable(self.root)
                self.run_id = claim(self.root, run_dir, adopt)
            except (ValueError, OSError) as e:
                error = e
        error = broadcast_object(error)
        if error is not None:
            raise error
        self.bound = True

    # ---- discovery -------------------------------------------------------------------------
    def _fs(self):
        fs, path = storage.filesystem(self.root)
        fs.invalidate_cache()  # listings are cached by s3fs; other ranks/processes write here
        return fs, path

    def list_tags(self) -> list[tuple[int, str, bool]]:
        """(step, tag, complete) for every checkpoint directory under root, oldest first."""
        return list_checkpoints(self.root)

    def latest_complete(self) -> str | None:
        complete = [tag for _, tag, done in self.list_tags() if done]
        return complete[-1] if complete else None

    # ---- save ------------------------------------------------------------------------------
    def save(self, step: int, engines: dict[str, Any], rank_meta: dict,
             rank_tensors: dict[str, torch.Tensor] | None = None,
             shared: dict[str, Any] | None = None,
             before_marker: Callable[[], None] | None = None) -> str:
        """Collective: every rank calls it with its own per-rank state. Returns the tag.
        `before_marker` runs on every rank once its files are written (fault injection). A
        store's error (the endpoint gone mid-upload) is an OSError naming the checkpoint; its
        marker, written last, is then not there."""
        tag = tag_for(step)
        with storage.naming_url(storage.join(self.root, tag), "saving checkpoint"):
            return self._save(tag, step, engines, rank_meta, rank_tensors, shared, before_marker)

    def _save(self, tag: str, step: int, engines: dict[str, Any], rank_meta: dict,
              rank_tensors: dict[str, torch.Tensor] | None, shared: dict[str, Any] | None,
              before_marker: Callable[[], None] | None) -> str:
        if self.bound:
            lost = broadcast_object(owner_change(self.root, self.run_id) if self.dist.is_main else None)
            if lost:
                raise CheckpointRootTaken(lost)
        local_dir = os.path.join(self.staging, tag)
        self.passed_over.discard(tag)  # set aside below, and written anew
        if self.dist.is_main:
            self._set_aside(tag)
        barrier()
        if self.dist.is_local_main and os.path.lexists(local_dir):
            # leftovers of an interrupted save of the same step; a symlink (to another root's
            # directory, or to nothing) goes alone
            if os.path.islink(local_dir):
                os.unlink(local_dir)
            else:
                shutil.rmtree(local_dir)
        if self.dist.is_main and self.remote:
            fs, path = self._fs()
            if fs.exists(f"{path}/{tag}"):
                fs.rm(f"{path}/{tag}", recursive=True)
        barrier()
        # A remote root's full disk is the node's temp dir, not the store: named so.
        staging = (storage.naming_url(local_dir, "staging it in") if self.remote
                   else contextlib.nullcontext())
        try:
            with staging:
                files = self._write_files(local_dir, step, engines, rank_meta, rank_tensors, shared,
                                          before_marker)
            self._publish_saved(tag, step, engines, local_dir, files)
        finally:
            # Uploaded, or of no use: nothing retries a failed upload, and a failed write (a full
            # disk) left the staged part of a checkpoint filling the node's temp dir. Once all
            # were gathered no rank writes there; before that, this rank's error ends the save.
            if self.remote and self.dist.is_local_main:
                self.unstage(local_dir)
        barrier()
        return tag

    def _write_files(self, local_dir: str, step: int, engines: dict[str, Any], rank_meta: dict,
                     rank_tensors: dict[str, torch.Tensor] | None, shared: dict[str, Any] | None,
                     before_marker: Callable[[], None] | None) -> dict[str, dict]:
        """Collective: every rank's files of the checkpoint; returns all ranks' entries for
        the marker."""
        from bdt.training.safe_load import recording_engine

        written: dict[str, dict] = {}
        for name, engine in engines.items():
            recorder = recording_engine(engine)
            recorder.saved.clear()
            engine.save_checkpoint(local_dir, tag=name, save_latest=False)
            written.update({integrity.rel_name(local_dir, p): integrity.digest(p)
                            for p in recorder.saved})
        written.update(write_rank_files(local_dir, self.dist.rank, self.dist.world_size, step,
                                        capture_rng(), rank_meta, rank_tensors or {}))
        if self.dist.is_main and shared is not None:
            buf = io.BytesIO()
            torch.save(shared, buf)
            storage.write_bytes_atomic(os.path.join(local_dir, SHARED_FILE), buf.getvalue())
            written[SHARED_FILE] = integrity.digest_bytes(buf.getvalue())
        if before_marker is not None:
            before_marker()
        files = {rel: entry for part in all_gather_object(written) for rel, entry in part.items()}
        if self.dist.is_main:  # files no engine recorded: DeepSpeed's recovery scripts (rank 0)
            files.update(integrity.digest_all(local_dir, skip=set(files)))
        return files

    def _publish_saved(self, tag: str, step: int, engines: dict[str, Any], local_dir: str,
                       files: dict[str, dict]) -> None:
        """Collective: upload a remote root's staged files, then the marker (rank 0), then prune."""
        if self.remote:
            if self.dist.is_local_main:
                upload_dir(local_dir, storage.join(self.root, tag))
            patient_barrier()  # each node's upload: minutes at scale
        if self.dist.is_main and self.remote:
            check_uploaded(storage.join(self.root, tag), files)
        if self.dist.is_main:
            marker = {"step": step, "world_size": self.dist.world_size, "engines": sorted(engines),
                      "settings": self.settings, "time": time.time(),
                      "files": dict(sorted(files.items()))}
            storage.write_bytes_atomic(storage.join(self.root, tag, MARKER), json.dumps(marker).encode())
            self.prune(upto_step=step)

    def _set_aside(self, tag: str) -> None:
        """A complete checkpoint where `tag` is about to be written (passed over by resume, or
        left by a run started with resume off) is moved, with its conversions, to unusable/."""
        fs, path = self._fs()
        if not fs.exists(f"{path}/{tag}/{MARKER}"):
            return
        dest = f"{path}/{UNUSABLE_DIR}/{time.strftime('%Y%m%dT%H%M%S')}-{tag}"
        for entry in fs.ls(path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name == tag or name.startswith(tag + "."):
                if self.remote:  # object stores: a server-side copy of each object, then delete
                    for obj in fs.find(f"{path}/{name}"):
                        fs.copy(obj, f"{dest}/{name}{obj[len(path) + 1 + len(name):]}")
                    remove_checkpoint_dir(fs, f"{path}/{name}")
                else:
                    os.makedirs(dest, exist_ok=True)
                    os.rename(f"{path}/{name}", f"{dest}/{name}")
        log.warning("checkpoint %s was complete but is being written again (resume passed over "
                    "it, or resume is off): moved to %s, not deleted", storage.join(self.root, tag),
                    storage.join(self.root, dest[len(path) + 1:]))

    def prune(self, upto_step: int | None = None) -> None:
        """Delete incomplete checkpoints and, among the complete ones up to `upto_step` (default
        all), all but the newest `keep_last`. Complete ones after it and those resume passed over
        are left alone, kept for inspection: a damaged one must not take the place of a good one
        among the last `keep_last`."""
        fs, path = self._fs()
        tags = self.list_tags()
        complete = [tag for step, tag, done in tags if done and tag not in self.passed_over
                    and (upto_step is None or step <= upto_step)]
        doomed = [tag for _, tag, done in tags if not done]
        if self.keep_last > 0:
            doomed += complete[:-self.keep_last]
        for tag in doomed:
            remove_checkpoint_dir(fs, f"{path}/{tag}")
        if doomed:  # and their conversions for other world sizes (<tag>.wNNNNN[.partial])
            for entry in fs.ls(path, detail=False):
                name = entry.rstrip("/").rsplit("/", 1)[-1]
                if "." in name and name.split(".", 1)[0] in doomed:
                    remove_checkpoint_dir(fs, f"{path}/{name}")

    def publish(self, built: str, tag: str, marker: dict) -> None:
        """Make a locally built checkpoint directory `tag`, its marker (with every file's size
        and hash) last."""
        marker = {**marker, "time": time.time(), "files": integrity.digest_all(built, skip=set())}
        marker_bytes = json.dumps(marker).encode()
        if not self.remote:
            storage.write_bytes_atomic(os.path.join(built, MARKER), marker_bytes)
            final = os.path.join(self.root, tag)
            shutil.rmtree(final, ignore_errors=True)  # an earlier attempt (incomplete or bad)
            os.rename(built, final)
            return
        fs, path = self._fs()
        if fs.exists(f"{path}/{tag}"):
            fs.rm(f"{path}/{tag}", recursive=True)
        upload_dir(built, storage.join(self.root, tag))
        storage.write_bytes_atomic(storage.join(self.root, tag, MARKER), marker_bytes)
        shutil.rmtree(built, ignore_errors=True)
