"""Checkpoints: DeepSpeed engine state + our per-rank state + a completion marker written last.

Layout of one checkpoint (`<root>/step_000001234/`):
  <engine name>/...            DeepSpeed `save_checkpoint` output (all ranks call it)
  rank_00000.json|.safetensors per-rank state: step, counters, data-stream position, RNG states
                               (DeepSpeed writes `client_state` only on data-parallel rank 0 under
                               ZeRO-1/2, so each rank needs its own file; ENVIRONMENT.md)
  shared.pt                    replicated non-engine state (EMA weights, a plain torch optimizer),
                               written by rank 0, read back with torch.load(weights_only=True)
  COMPLETE                     written by rank 0 after a barrier, i.e. after every other file.
A checkpoint without COMPLETE (a crash or kill mid-save) is ignored by resume and pruned later.
Nothing here is unpickled except through `weights_only=True`; per-rank state is JSON + safetensors.

For a remote root (s3://...) every node saves into a local staging directory, its local rank 0
uploads what the node wrote, and the marker is uploaded after a barrier, so it is again last.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from bdt import storage
from bdt.trainer.distributed import DistInfo, barrier, broadcast_object

MARKER = "COMPLETE"
SHARED_FILE = "shared.pt"
_TAG_RE = re.compile(r"^step_(\d{9})$")


def tag_for(step: int) -> str:
    return f"step_{step:09d}"


def _rank_file(rank: int, ext: str) -> str:
    return f"rank_{rank:05d}.{ext}"


def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """torch / numpy / python RNG states as (JSON-able dict, tensors); no pickle involved."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    meta = {"numpy": {"kind": np_kind, "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                      "cached_gaussian": float(np_gauss)},
            "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss}}
    tensors = {"rng.torch": torch.get_rng_state(),
               "rng.numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available() and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["rng.numpy_keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


class CheckpointManager:
    """Save / find / load checkpoints under `root` (local path or fsspec URL)."""

    def __init__(self, root: str, dist: DistInfo, keep_last: int = 3, staging_dir: str | None = None):
        self.root = root.rstrip("/")
        self.dist = dist
        self.keep_last = keep_last
        self.remote = storage.is_remote(self.root)
        if self.remote:
            name = re.sub(r"[^A-Za-z0-9]+", "_", self.root)[-80:]
            self.staging = staging_dir or os.path.join(tempfile.gettempdir(), "bdt-ckpt-staging", name)
        else:
            self.staging = self.root

    # ---- discovery -------------------------------------------------------------------------
    def _fs(self):
        fs, path = storage.filesystem(self.root)
        fs.invalidate_cache()  # listings are cached by s3fs; other ranks/processes write here
        return fs, path

    def list_tags(self) -> list[tuple[int, str, bool]]:
        """(step, tag, complete) for every checkpoint directory under root, oldest first."""
        fs, path = self._fs()
        if not fs.exists(path):
            return []
        out = []
        for entry in fs.ls(path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            match = _TAG_RE.match(name)
            if match:
                out.append((int(match.group(1)), name, fs.exists(f"{path}/{name}/{MARKER}")))
        return sorted(out)

    def latest_complete(self) -> str | None:
        complete = [tag for _, tag, done in self.list_tags() if done]
        return complete[-1] if complete else None

    # ---- save ------------------------------------------------------------------------------
    def save(self, step: int, engines: dict[str, Any], rank_meta: dict,
             rank_tensors: dict[str, torch.Tensor] | None = None,
             shared: dict[str, Any] | None = None) -> str:
        """Collective: every rank calls it with its own per-rank state. Returns the tag."""
        tag = tag_for(step)
        local_dir = os.path.join(self.staging, tag)
        if self.dist.is_local_main and os.path.exists(local_dir):
            shutil.rmtree(local_dir)  # leftovers of an interrupted save of the same step
        if self.dist.is_main and self.remote:
            fs, path = self._fs()
            if fs.exists(f"{path}/{tag}"):
                fs.rm(f"{path}/{tag}", recursive=True)
        barrier()
        for name, engine in engines.items():
            engine.save_checkpoint(local_dir, tag=name, save_latest=False)
        rng_meta, rng_tensors = capture_rng()
        meta = {"step": step, "rank": self.dist.rank, "world_size": self.dist.world_size,
                "rng": rng_meta, "state": rank_meta}
        tensors = {**rng_tensors, **{f"user.{k}": v.contiguous() for k, v in (rank_tensors or {}).items()}}
        storage.write_bytes_atomic(os.path.join(local_dir, _rank_file(self.dist.rank, "json")),
                                   json.dumps(meta).encode())
        storage.write_bytes_atomic(os.path.join(local_dir, _rank_file(self.dist.rank, "safetensors")),
                                   st_save(tensors))
        if self.dist.is_main and shared is not None:
            buf = io.BytesIO()
            torch.save(shared, buf)
            storage.write_bytes_atomic(os.path.join(local_dir, SHARED_FILE), buf.getvalue())
        barrier()
        if self.remote:
            if self.dist.is_local_main:
                self._upload(local_dir, storage.join(self.root, tag))
            barrier()
        if self.dist.is_main:
            marker = {"step": step, "world_size": self.dist.world_size, "engines": sorted(engines),
                      "time": time.time()}
            storage.write_bytes_atomic(storage.join(self.root, tag, MARKER), json.dumps(marker).encode())
            self.prune()
        if self.remote and self.dist.is_local_main:
            shutil.rmtree(local_dir, ignore_errors=True)
        barrier()
        return tag

    def _upload(self, local_dir: str, remote_dir: str) -> None:
        fs, _ = storage.filesystem(remote_dir)
        for dirpath, _, files in os.walk(local_dir):
            for fname in files:
                src = os.path.join(dirpath, fname)
                rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
                fs.put_file(src, storage.filesystem(storage.join(remote_dir, rel))[1])

    def prune(self) -> None:
        """Delete incomplete checkpoints and all but the newest `keep_last` complete ones."""
        fs, path = self._fs()
        tags = self.list_tags()
        complete = [tag for _, tag, done in tags if done]
        doomed = [tag for _, tag, done in tags if not done]
        if self.keep_last > 0:
            doomed += complete[:-self.keep_last]
        for tag in doomed:
            fs.rm(f"{path}/{tag}", recursive=True)

    # ---- load ------------------------------------------------------------------------------
    def load(self, tag: str, engines: dict[str, Any], load_optimizer: bool = True
             ) -> tuple[dict, dict[str, torch.Tensor], dict[str, Any] | None]:
        """Collective: restore engines, this rank's RNG; return (rank_meta, rank_tensors, shared)."""
        local_dir = os.path.join(self.staging, tag)
        if self.remote:
            if self.dist.is_local_main:
                shutil.rmtree(local_dir, ignore_errors=True)
                self._download(storage.join(self.root, tag), local_dir)
            barrier()
        json_path = os.path.join(local_dir, _rank_file(self.dist.rank, "json"))
        if not os.path.exists(json_path):
            raise ValueError(f"checkpoint {storage.join(self.root, tag)} has no state for rank "
                             f"{self.dist.rank}: it was saved with a different world size (this run "
                             f"has {self.dist.world_size}); convert it with deepspeed.checkpoint."
                             f"ds_to_universal or resume with the original world size")
        with open(json_path, "rb") as f:
            meta = json.loads(f.read())
        if meta["world_size"] != self.dist.world_size:
            raise ValueError(f"checkpoint {tag} was saved with world size {meta['world_size']}, "
                             f"this run has {self.dist.world_size}")
        with open(os.path.join(local_dir, _rank_file(self.dist.rank, "safetensors")), "rb") as f:
            tensors = st_load(f.read())
        for name, engine in engines.items():
            path, _ = engine.load_checkpoint(local_dir, tag=name, load_optimizer_states=load_optimizer,
                                             load_lr_scheduler_states=load_optimizer)
            if path is None:
                raise ValueError(f"checkpoint {storage.join(self.root, tag)}: engine '{name}' "
                                 f"could not be loaded")
        shared = None
        shared_path = os.path.join(local_dir, SHARED_FILE)
        if os.path.exists(shared_path):
            shared = torch.load(shared_path, map_location="cpu", weights_only=True)
        restore_rng(meta["rng"], tensors)
        user = {k[len("user."):]: v for k, v in tensors.items() if k.startswith("user.")}
        barrier()
        if self.remote and self.dist.is_local_main:
            shutil.rmtree(local_dir, ignore_errors=True)
        return meta["state"], user, shared

    def _download(self, remote_dir: str, local_dir: str) -> None:
        fs, path = storage.filesystem(remote_dir)
        fs.invalidate_cache()
        for src in fs.find(path):
            rel = src[len(path):].lstrip("/")
            dst = os.path.join(local_dir, *rel.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            fs.get_file(src, dst)

    def resume_tag(self) -> str | None:
        """The newest complete tag, chosen by rank 0 and shared so all ranks agree."""
        tag = self.latest_complete() if self.dist.is_main else None
        return broadcast_object(tag)
