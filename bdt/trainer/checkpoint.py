"""Checkpoints: DeepSpeed engine state + our per-rank state + a completion marker written last.

Layout of one checkpoint (`<root>/step_000001234/`):
  <engine name>/...            DeepSpeed `save_checkpoint` output (all ranks call it)
  rank_00000.json|.safetensors per-rank state: step, counters, data-stream position, RNG states
                               (DeepSpeed writes `client_state` only on data-parallel rank 0 under
                               ZeRO-1/2, so each rank needs its own file; environment.md)
  shared.pt                    replicated non-engine state (EMA weights, a plain torch optimizer),
                               written by rank 0, read back with torch.load(weights_only=True)
  COMPLETE                     written by rank 0 after a barrier, i.e. after every other file.
A checkpoint without COMPLETE (a crash or kill mid-save) is ignored by resume and pruned later.
Nothing here is unpickled except through `weights_only=True`; per-rank state is JSON + safetensors.

Resuming on another number of ranks (`load(..., reshard=fn)`): global rank 0 converts the
checkpoint once, beside it, and every rank then loads the conversion (bdt/trainer/reshard.py):
  <tag>.w00004/<engine name>/   DeepSpeed universal checkpoint (ds_to_universal) of an engine
                                whose optimizer state is partitioned (ZeRO-1/2/3); a ZeRO-0
                                engine loads its unpartitioned original as it is
  <tag>.w00004/rank_00000.*     per-rank state for 4 ranks: `fn(old states, 4)`, fresh RNGs
  <tag>.w00004/COMPLETE         last (local: built as <tag>.w00004.partial, then renamed)
The universal checkpoint is loaded with DeepSpeed's `load_universal` switched on for that one
load only; the LR scheduler state comes back with it (the first step runs at the saved LR).

For a remote root (s3://...) every node saves into a local staging directory, its local rank 0
uploads what the node wrote, and the marker is uploaded after a barrier, so it is again last.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
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
    meta, tensors = _rng_record(np.random.get_state(), random.getstate(), torch.get_rng_state())
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return meta, tensors


def seeded_rng(seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """A fresh RNG record (capture_rng's format) seeded with `seed`, for a rank that has none."""
    meta, tensors = _rng_record(np.random.RandomState(seed % 2**32).get_state(),
                                random.Random(seed).getstate(),
                                torch.Generator().manual_seed(seed).get_state())
    meta["cuda_seed"] = seed
    return meta, tensors


def _rng_record(np_state: tuple, py_state: tuple, torch_state: torch.Tensor
                ) -> tuple[dict, dict[str, torch.Tensor]]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    py_version, py_internal, py_gauss = py_state
    meta = {"numpy": {"kind": np_kind, "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                      "cached_gaussian": float(np_gauss)},
            "python": {"version": py_version, "state": list(py_internal), "gauss_next": py_gauss}}
    return meta, {"rng.torch": torch_state,
                  "rng.numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available() and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    elif torch.cuda.is_available() and "cuda_seed" in meta:
        torch.cuda.manual_seed(meta["cuda_seed"])
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
        _write_rank_files(local_dir, self.dist.rank, self.dist.world_size, step, capture_rng(),
                          rank_meta, rank_tensors or {})
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
        if doomed:  # and their conversions for other world sizes (<tag>.wNNNNN[.partial])
            for entry in fs.ls(path, detail=False):
                name = entry.rstrip("/").rsplit("/", 1)[-1]
                if "." in name and name.split(".", 1)[0] in doomed:
                    fs.rm(f"{path}/{name}", recursive=True)

    # ---- load ------------------------------------------------------------------------------
    def load(self, tag: str, engines: dict[str, Any], load_optimizer: bool = True,
             reshard: Callable[[list[tuple[dict, dict]], int], list[tuple[dict, dict]]]
             | None = None
             ) -> tuple[dict, dict[str, torch.Tensor], dict[str, Any] | None]:
        """Collective: restore engines, this rank's RNG; return (rank_meta, rank_tensors, shared).

        A checkpoint of another world size needs `reshard(old per-rank (state, tensors), new
        world size) -> new per-rank (state, tensors)`; it is converted first (module doc)."""
        # A marker without it (hand-made) counts as this world size; the rank files still check.
        saved_world = self._marker(tag).get("world_size", self.dist.world_size)
        conv = None
        if saved_world != self.dist.world_size:
            if reshard is None:
                raise ValueError(f"checkpoint {storage.join(self.root, tag)} was saved with world "
                                 f"size {saved_world}, this run has {self.dist.world_size}, and "
                                 f"its state cannot be re-split here: resume with the original "
                                 f"world size")
            conv = self._convert(tag, saved_world, engines, reshard)
        universal = set(self._marker(conv)["universal"]) if conv else set()
        fetched = {tag: self._fetch(tag, skip=universal)}
        if conv:
            fetched[conv] = self._fetch(conv)
        state_dir = fetched[conv or tag]
        meta, tensors = _read_rank_files(state_dir, self.dist.rank)
        if meta["world_size"] != self.dist.world_size:
            raise ValueError(f"checkpoint {tag} was saved with world size {meta['world_size']}, "
                             f"this run has {self.dist.world_size}")
        for name, engine in engines.items():
            src = fetched[conv] if name in universal else fetched[tag]
            with _universal_load(engine, name in universal):
                path, _ = engine.load_checkpoint(src, tag=name,
                                                 load_optimizer_states=load_optimizer,
                                                 load_lr_scheduler_states=load_optimizer)
            if path is None:
                raise ValueError(f"checkpoint {storage.join(self.root, tag)}: engine '{name}' "
                                 f"could not be loaded")
        shared = None
        shared_path = os.path.join(fetched[tag], SHARED_FILE)
        if os.path.exists(shared_path):
            shared = torch.load(shared_path, map_location="cpu", weights_only=True)
        restore_rng(meta["rng"], tensors)
        user = _user(tensors)
        barrier()
        if self.remote and self.dist.is_local_main:
            for local_dir in fetched.values():
                shutil.rmtree(local_dir, ignore_errors=True)
        return meta["state"], user, shared

    def _marker(self, tag: str) -> dict:
        return json.loads(storage.read_bytes(storage.join(self.root, tag, MARKER)))

    def _fetch(self, tag: str, skip: set[str] = frozenset()) -> str:
        """Collective: the local directory of `tag` (downloaded per node for a remote root,
        without the engine subdirectories in `skip`)."""
        local_dir = os.path.join(self.staging, tag)
        if self.remote:
            if self.dist.is_local_main:
                shutil.rmtree(local_dir, ignore_errors=True)
                self._download(storage.join(self.root, tag), local_dir, skip)
            barrier()
        return local_dir

    def _convert(self, tag: str, saved_world: int, engines: dict[str, Any], reshard) -> str:
        """Collective: the tag of `tag` converted for this world size, made by rank 0 unless a
        complete conversion is already there; a failure on rank 0 raises on every rank."""
        from bdt.trainer.reshard import to_universal

        conv = f"{tag}.w{self.dist.world_size:05d}"
        error = None
        if self.dist.is_main and not storage.exists(storage.join(self.root, conv, MARKER)):
            try:
                src = self._fetch_here(tag)
                out = os.path.join(self.staging, conv + ".partial")
                shutil.rmtree(out, ignore_errors=True)
                os.makedirs(out)
                universal = sorted(n for n in engines
                                   if to_universal(os.path.join(src, n), os.path.join(out, n)))
                old = [_read_rank_files(src, r) for r in range(saved_world)]
                step = int(old[0][0]["step"])
                states = reshard([(m["state"], _user(t)) for m, t in old], self.dist.world_size)
                for rank, (state, tensors) in enumerate(states):
                    _write_rank_files(out, rank, self.dist.world_size, step,
                                      seeded_rng(_rank_seed(old[0][1]["rng.torch"], step, rank)),
                                      state, tensors)
                marker = {"step": step, "world_size": self.dist.world_size,
                          "from_world_size": saved_world, "universal": universal}
                self._publish(out, conv, marker)
                if self.remote:
                    shutil.rmtree(src, ignore_errors=True)
            except Exception as e:  # noqa: BLE001 (re-raised on every rank below)
                error = f"{type(e).__name__}: {e}"
        error = broadcast_object(error)
        if error:
            raise ValueError(f"converting checkpoint {storage.join(self.root, tag)} from world "
                             f"size {saved_world} to {self.dist.world_size} failed: {error}")
        return conv

    def _fetch_here(self, tag: str) -> str:
        """This process alone: the local directory of `tag` (downloaded for a remote root)."""
        if not self.remote:
            return os.path.join(self.root, tag)
        local_dir = os.path.join(self.staging, tag)
        shutil.rmtree(local_dir, ignore_errors=True)
        self._download(storage.join(self.root, tag), local_dir)
        return local_dir

    def _publish(self, built: str, tag: str, marker: dict) -> None:
        """Make a locally built checkpoint directory `tag`, its marker last."""
        marker_bytes = json.dumps({**marker, "time": time.time()}).encode()
        if not self.remote:
            storage.write_bytes_atomic(os.path.join(built, MARKER), marker_bytes)
            final = os.path.join(self.root, tag)
            shutil.rmtree(final, ignore_errors=True)  # an incomplete earlier attempt
            os.rename(built, final)
            return
        fs, path = self._fs()
        if fs.exists(f"{path}/{tag}"):
            fs.rm(f"{path}/{tag}", recursive=True)
        self._upload(built, storage.join(self.root, tag))
        storage.write_bytes_atomic(storage.join(self.root, tag, MARKER), marker_bytes)
        shutil.rmtree(built, ignore_errors=True)

    def _download(self, remote_dir: str, local_dir: str, skip: set[str] = frozenset()) -> None:
        fs, path = storage.filesystem(remote_dir)
        fs.invalidate_cache()
        for src in fs.find(path):
            rel = src[len(path):].lstrip("/")
            if rel.split("/", 1)[0] in skip:
                continue
            dst = os.path.join(local_dir, *rel.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            fs.get_file(src, dst)

    def resume_tag(self) -> str | None:
        """The newest complete tag, chosen by rank 0 and shared so all ranks agree."""
        tag = self.latest_complete() if self.dist.is_main else None
        return broadcast_object(tag)


def _write_rank_files(local_dir: str, rank: int, world_size: int, step: int,
                      rng: tuple[dict, dict[str, torch.Tensor]], state: dict,
                      tensors: dict[str, torch.Tensor]) -> None:
    rng_meta, rng_tensors = rng
    meta = {"step": step, "rank": rank, "world_size": world_size, "rng": rng_meta, "state": state}
    flat = {**rng_tensors, **{f"user.{k}": v.contiguous() for k, v in tensors.items()}}
    storage.write_bytes_atomic(os.path.join(local_dir, _rank_file(rank, "json")),
                               json.dumps(meta).encode())
    storage.write_bytes_atomic(os.path.join(local_dir, _rank_file(rank, "safetensors")),
                               st_save(flat))


def _read_rank_files(local_dir: str, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    json_path = os.path.join(local_dir, _rank_file(rank, "json"))
    if not os.path.exists(json_path):
        raise ValueError(f"checkpoint {local_dir} has no state for rank {rank} "
                         f"({_rank_file(rank, 'json')} is missing): an incomplete copy?")
    with open(json_path, "rb") as f:
        meta = json.loads(f.read())
    with open(os.path.join(local_dir, _rank_file(rank, "safetensors")), "rb") as f:
        return meta, st_load(f.read())


def _user(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("user."):]: v for k, v in tensors.items() if k.startswith("user.")}


def _rank_seed(old_rank0_torch_rng: torch.Tensor, step: int, rank: int) -> int:
    """A new rank's RNG seed: fixed by the run (its saved RNG), the step and the rank."""
    h = hashlib.sha256(old_rank0_torch_rng.numpy().tobytes())
    h.update(f"{step}/{rank}".encode())
    return int.from_bytes(h.digest()[:8], "little") >> 1


class _universal_load:
    """DeepSpeed's `checkpoint.load_universal` switched on around one `load_checkpoint` call:
    DeepSpeed 0.19.8 reads the flag only there, so this equals starting the engine with it and
    switching it off again for later resumes (environment.md)."""

    def __init__(self, engine, on: bool):
        self.config, self.on = getattr(engine, "_config", None), on

    def __enter__(self):
        if self.on:
            self.before = self.config.load_universal_checkpoint
            self.config.load_universal_checkpoint = True

    def __exit__(self, *exc):
        if self.on:
            self.config.load_universal_checkpoint = self.before
