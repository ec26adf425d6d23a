"""Resuming from a checkpoint: find the newest usable one, verify it, load it (system §2).

Resume (`resume`) tries the complete checkpoints newest first. Each is verified before anything
is loaded (every rank checks a share of the files against the marker, and the pickles for
globals a weights-only load refuses), then loaded with DeepSpeed's files read weights-only
(safe_load.py). One that fails is reported with its path and reason and the next older one is
tried; none usable is an error naming each. Nothing is deleted for failing (checkpoint.py).

Resuming on another number of ranks (`load(..., reshard=fn)`): global rank 0 converts the
checkpoint once, beside it, and every rank then loads the conversion (checkpoint_convert.py):
  <tag>.w00004/<engine name>/   DeepSpeed universal checkpoint (ds_to_universal) of an engine
                                whose optimizer state is partitioned (ZeRO-1/2/3); a ZeRO-0
                                engine loads its unpartitioned original as it is
  <tag>.w00004/rank_00000.*     per-rank state for 4 ranks: `fn(old states, 4)`, fresh RNGs
  <tag>.w00004/COMPLETE         last, with its files' hashes (local: built as .partial, renamed)
The universal checkpoint is loaded with DeepSpeed's `load_universal` switched on for that one
load only; the LR scheduler's position comes back with it (its LR is then the config's:
schedule.py).

For a remote root (s3://...) each node downloads the checkpoint into its staging directory and
checks its own copy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bdt import storage
from bdt.training import integrity
from bdt.training.checkpoint_convert import convert, universal_load
from bdt.training.checkpoint_store import download_dir
from bdt.training.distributed import all_gather_object, barrier, broadcast_object
from bdt.training.integrity import CheckpointUnusable
from bdt.training.patient_barrier import patient_barrier
from bdt.training.rank_state import rank_file, read_rank_files, restore_rng, user_tensors

log = logging.getLogger(__name__)
SHARED_FILE = "shared.pt"

Reshard = Callable[[list[tuple[dict, dict]], int], list[tuple[dict, dict]]]
# (checkpoint path, rank 0's saved trainer state, its marker) -> None, or a ValueError refusing
# the resume: run before any file but that state is fetched, verified or loaded.
BeforeLoad = Callable[[str, dict, dict], None]


@dataclass
class Resumed:
    tag: str
    meta: dict  # this rank's saved state
    tensors: dict[str, torch.Tensor]
    shared: dict[str, Any] | None
    skipped: list[str]  # newer complete checkpoints passed over: "<path>: <reason>"


class CheckpointLoader:
    """The resume half of CheckpointManager (checkpoint.py): its constructor sets what these
    methods read (root, dist, settings, versions, staging, own_staging, remote, passed_over, _share),
    and its `list_tags` lists the checkpoints."""

    def resume(self, engines: dict[str, Any], load_optimizer: bool = True,
               reshard: Reshard | None = None, fresh: bool = False,
               before_load: BeforeLoad | None = None) -> Resumed | None:
        """Collective: load the newest complete checkpoint that passes verification and loads,
        reporting each newer one passed over (rank 0 logs path and reason). None when there
        is no complete checkpoint; ValueError naming each when none is usable.
        `fresh` (checkpoint.resume=false) loads nothing and refuses a root holding complete
        checkpoints: the run would start at step 0 beside them, and its next restart (resume
        on) would continue from their newest, another run's weights.
        `before_load` refuses a resume its records decide (another seed, image tokenizer):
        its ValueError ends the resume before a checkpoint's tensors are read (minutes at
        1B parameters), and no older checkpoint is tried."""
        tags = broadcast_object([t for _, t, done in self.list_tags() if done]
                                if self.dist.is_main else None)
        if fresh:
            if tags:
                raise ValueError(f"checkpoint.resume=false, but {self.root} holds complete "
                                 f"checkpoints (newest {tags[-1]}) that a later resume would "
                                 f"continue from: give a new checkpoint.dir (or run_dir), or "
                                 f"remove them")
            return None
        skipped: list[str] = []
        for tag in reversed(tags):
            try:
                meta, tensors, shared = self.load(tag, engines, load_optimizer, reshard,
                                                  before_load)
            except CheckpointUnusable as e:
                skipped.append(str(e))
                self.passed_over.add(tag)
                if self.dist.is_main:
                    log.warning("checkpoint skipped: %s", e)
                continue
            return Resumed(tag, meta, tensors, shared, skipped)
        if not tags:
            return None
        raise ValueError(f"no usable checkpoint under {self.root} ({len(tags)} complete, all "
                         f"failed; none was deleted): " + " | ".join(skipped))

    def load(self, tag: str, engines: dict[str, Any], load_optimizer: bool = True,
             reshard: Reshard | None = None, before_load: BeforeLoad | None = None
             ) -> tuple[dict, dict[str, torch.Tensor], dict[str, Any] | None]:
        """Collective: verify `tag`, restore engines and this rank's RNG; return (rank_meta,
        rank_tensors, shared). CheckpointUnusable (on every rank) when it fails verification or
        loading. A checkpoint of another world size needs `reshard(old per-rank (state,
        tensors), new world size) -> new per-rank (state, tensors)`; it is converted first."""
        marker = self._shared_marker(tag)
        self._check_settings(tag, marker)
        if before_load is not None:
            self._before_load(before_load, tag, marker)
        saved_world = marker.get("world_size", self.dist.world_size)
        conv = None
        if saved_world != self.dist.world_size:
            if reshard is None:
                raise ValueError(f"checkpoint {storage.join(self.root, tag)} was saved with world "
                                 f"size {saved_world}, this run has {self.dist.world_size}, and "
                                 f"its state cannot be re-split here: resume with the original "
                                 f"world size")
            conv = convert(self, tag, marker, engines, reshard)
        conv_marker = self._shared_marker(conv) if conv else {}
        universal = set(conv_marker.get("universal", []))
        fetched = {tag: self._fetch(tag, skip=universal)}
        if conv:
            fetched[conv] = self._fetch(conv)
        try:
            self._verify(tag, marker, fetched[tag], skip=universal)
            if conv:
                self._verify(conv, conv_marker, fetched[conv])
            error, result = None, None
            try:
                result = self._load_verified(tag, conv, universal, fetched, engines, load_optimizer)
            except Exception as e:  # noqa: BLE001 (gathered: every rank raises the same below)
                error = f"rank {self.dist.rank}: {type(e).__name__}: {e}"
            errors = [e for e in all_gather_object(error) if e]
            if errors:
                raise CheckpointUnusable(f"{storage.join(self.root, tag)}: loading failed: "
                                         + "; ".join(errors))
        finally:
            barrier()
            if self.remote and self.dist.is_local_main:
                self.unstage(*fetched.values())
        return result

    def _load_verified(self, tag: str, conv: str | None, universal: set[str],
                       fetched: dict[str, str], engines: dict[str, Any], load_optimizer: bool):
        from bdt.training.safe_load import recording_engine, weights_only_loads

        meta, tensors = read_rank_files(fetched[conv or tag], self.dist.rank)
        if meta["world_size"] != self.dist.world_size:
            raise ValueError(f"its rank files are for world size {meta['world_size']}, this run "
                             f"has {self.dist.world_size}")
        for name, engine in engines.items():
            src = fetched[conv] if name in universal else fetched[tag]
            recording_engine(engine)
            with weights_only_loads(), universal_load(engine, name in universal):
                path, _ = engine.load_checkpoint(src, tag=name,
                                                 load_optimizer_states=load_optimizer,
                                                 load_lr_scheduler_states=load_optimizer)
            if path is None:
                raise ValueError(f"DeepSpeed could not load engine '{name}'")
        shared = None
        shared_path = os.path.join(fetched[tag], SHARED_FILE)
        if os.path.exists(shared_path):
            shared = torch.load(shared_path, map_location="cpu", weights_only=True)
        restore_rng(meta["rng"], tensors)
        return meta["state"], user_tensors(tensors), shared

    def _check_settings(self, tag: str, marker: dict) -> None:
        """A ValueError (the run's config, not the checkpoint, is at fault: no fallback) when
        `tag` was written with other settings; markers from before settings were recorded pass.
        A version (CheckpointManager's `versions`) a marker lacks is 1: it was written before
        the version was recorded, which was from its version 2 on."""
        saved = marker.get("settings") or {}
        for key, (ours, what) in self.versions.items():
            theirs = saved.get(key, 1)
            if theirs != ours:
                raise ValueError(f"checkpoint {storage.join(self.root, tag)} was written with "
                                 f"{key} {theirs!r}, this bdt's is {ours!r} ({what}), and a "
                                 f"resume would mix the two: start a new run directory (run_dir)")
        changed = [k for k, v in self.settings.items() if k in saved and saved[k] != v]
        if changed:
            raise ValueError(f"checkpoint {storage.join(self.root, tag)} was written with "
                             + ", ".join(f"{k}={saved[k]!r}" for k in changed) + "; this run has "
                             + ", ".join(f"{k}={self.settings[k]!r}" for k in changed)
                             + ": resume with the checkpoint's settings, or start a new checkpoint "
                               "directory")

    def _before_load(self, before_load: BeforeLoad, tag: str, marker: dict) -> None:
        """Collective: `before_load` on every rank, and the same refusal on every rank when it
        refuses on any: a rank raising alone (another listing of the shards, say) would leave
        the others in the fetch's or verification's collective, hung on NCCL."""
        error = None
        try:
            before_load(storage.join(self.root, tag), self._first_state(tag, marker), marker)
        except CheckpointUnusable:
            raise  # _first_state's: the same on every rank already
        except Exception as e:  # noqa: BLE001 (gathered: every rank raises the same below)
            error = (isinstance(e, ValueError), f"{e}" if isinstance(e, ValueError)
                     else f"rank {self.dist.rank}: {type(e).__name__}: {e}")
        errors = [e for e in all_gather_object(error) if e]
        if errors:
            refusal, message = errors[0]
            raise (ValueError if refusal else RuntimeError)(message)

    def _first_state(self, tag: str, marker: dict) -> dict:
        """Collective: rank 0's saved trainer state in `tag` (its small JSON file alone, checked
        against the marker), or the same CheckpointUnusable on every rank."""
        state, error = None, None
        if self.dist.is_main:
            name = rank_file(0, "json")
            try:
                entry = self._listed(tag, marker).get(name)
                data = storage.read_bytes(storage.join(self.root, tag, name), "reading checkpoint")
                if not isinstance(entry, dict) or any(
                        entry.get(k) != v for k, v in integrity.digest_bytes(data).items()):
                    raise ValueError(f"{name}: not listed in the marker, or its size or "
                                     f"{integrity.HASH} differs from the marker's")
                record = json.loads(data)
                state = record.get("state") if isinstance(record, dict) else None
                if not isinstance(state, dict):
                    raise ValueError(f"{name}: holds no 'state' object")
            except CheckpointUnusable as e:
                error = str(e)
            except (OSError, ValueError) as e:
                error = f"{storage.join(self.root, tag)}: {e}"
        state, error = broadcast_object((state, error))
        if error:
            raise CheckpointUnusable(error)
        return state

    def _listed(self, tag: str, marker: dict) -> dict:
        """The marker's {file: {bytes, sha256}}; CheckpointUnusable when it lists none."""
        files = marker.get("files")
        if not isinstance(files, dict) or not files:
            raise CheckpointUnusable(f"{storage.join(self.root, tag)}: its marker lists no files "
                                     f"(written before bdt recorded checksums?), so it cannot be "
                                     f"verified")
        return files

    def _shared_marker(self, tag: str) -> dict:
        """Collective: `tag`'s marker, or the same CheckpointUnusable on every rank."""
        marker, error = None, None
        try:
            marker = self.read_marker(tag)
        except CheckpointUnusable as e:
            error = str(e)
        errors = [e for e in all_gather_object(error) if e]
        if errors:
            raise CheckpointUnusable(errors[0])
        return marker

    def read_marker(self, tag: str) -> dict:
        return integrity.read_marker(storage.join(self.root, tag))

    def _verify(self, tag: str, marker: dict, local_dir: str, skip: set[str] = frozenset()) -> None:
        """Collective: every file the marker lists (outside the engine directories in `skip`)
        is checked by one rank; CheckpointUnusable on every rank if any fails."""
        files = self._listed(tag, marker)
        index, count = self._check_share()
        names = sorted(r for r in files if r.split("/", 1)[0] not in skip)
        mine = [integrity.problem(local_dir, rel, files[rel]) for rel in names[index::count]]
        if index == 0:  # a file the marker does not list could be loaded unverified: refused
            mine += [f"{rel}: not listed in the marker" for rel in integrity.unlisted(local_dir, files, skip)]
        problems = [p for part in all_gather_object([p for p in mine if p]) for p in part]
        if problems:
            more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
            raise CheckpointUnusable(f"{storage.join(self.root, tag)}: "
                                     + "; ".join(problems[:4]) + more)

    def unstage(self, *local_dirs: str) -> None:
        """This node's local rank 0, once no rank of the node reads or writes them: remove staged
        copies, then bdt's own staging folder of this root if they were all it held (every
        other use of it on this node follows a collective step that rank waits for)."""
        for local_dir in local_dirs:
            shutil.rmtree(local_dir, ignore_errors=True)
        if self.own_staging:
            with contextlib.suppress(OSError):  # not empty: another checkpoint is staged there
                os.rmdir(self.staging)

    def _check_share(self) -> tuple[int, int]:
        """(index, count) splitting the file checks: over all ranks for a local root (one shared
        directory); over each node's ranks for a remote one (every node checks its own copy)."""
        if self._share is None:
            hosts = all_gather_object(socket.gethostname())
            if self.remote:
                peers = [r for r, h in enumerate(hosts) if h == hosts[self.dist.rank]]
                self._share = (peers.index(self.dist.rank), len(peers))
            else:
                self._share = (self.dist.rank, self.dist.world_size)
        return self._share

    def _fetch(self, tag: str, skip: set[str] = frozenset()) -> str:
        """Collective: the local directory of `tag` (downloaded per node for a remote root,
        without the engine subdirectories in `skip`)."""
        local_dir = os.path.join(self.staging, tag)
        if self.remote:
            if self.dist.is_local_main:
                shutil.rmtree(local_dir, ignore_errors=True)
                download_dir(storage.join(self.root, tag), local_dir, skip)
            patient_barrier()  # each node's download: minutes at scale
        return local_dir

    def fetch_here(self, tag: str) -> str:
        """This process alone: the local directory of `tag` (downloaded for a remote root)."""
        if not self.remote:
            return os.path.join(self.root, tag)
        local_dir = os.path.join(self.staging, tag)
        shutil.rmtree(local_dir, ignore_errors=True)
        download_dir(storage.join(self.root, tag), local_dir)
        return local_dir
