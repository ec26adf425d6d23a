"""A checkpoint converted for another number of ranks, beside the original (system §2).

`<tag>.wNNNNN` is made once, by global rank 0, from the verified original: DeepSpeed universal
checkpoints of the engines with partitioned optimizer state (`to_universal`: DeepSpeed's
`ds_to_universal --inject_missing_state`, run weights-only through `python -m
bdt.training.safe_load`, loads at any data-parallel size with weights and Adam moments bitwise,
environment.md; a ZeRO-0 checkpoint keeps the whole optimizer in one file and loads as it is),
per-rank state re-split by the trainer's `reshard` function,
fresh per-rank RNGs, and its own marker with every file's size and sha256. A conversion that no
longer verifies is derived data: it is rebuilt from the original.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import torch

from bdt import storage
from bdt.training import integrity
from bdt.training.distributed import broadcast_object
from bdt.training.patient_barrier import patient_barrier
from bdt.training.integrity import MARKER, CheckpointUnusable
from bdt.training.rank_state import read_rank_files, seeded_rng, user_tensors, write_rank_files
from bdt.training.safe_load import PARENT_ENV

if TYPE_CHECKING:
    from bdt.training.checkpoint import CheckpointManager
    from bdt.training.checkpoint_load import Reshard


def conversion_tag(tag: str, world_size: int) -> str:
    return f"{tag}.w{world_size:05d}"


def convert(mgr: CheckpointManager, tag: str, marker: dict, engines: dict[str, Any],
            reshard: Reshard) -> str:
    """Collective: the tag of `tag` converted for this world size, made by rank 0 (after
    verifying the original) unless a verified conversion is already there; a failure on rank 0
    raises CheckpointUnusable on every rank."""

    saved_world, world = marker["world_size"], mgr.dist.world_size
    conv = conversion_tag(tag, world)
    error = None
    if mgr.dist.is_main and not _verifies_here(mgr, conv):
        src, out = None, os.path.join(mgr.staging, conv + ".partial")
        try:
            src = mgr.fetch_here(tag)
            problems = [p for rel, entry in sorted((marker.get("files") or {}).items())
                        if (p := integrity.problem(src, rel, entry))]
            if not marker.get("files") or problems:
                raise CheckpointUnusable("; ".join(problems[:4]) or "its marker lists no files")
            old = [read_rank_files(src, r) for r in range(saved_world)]
            step = int(old[0][0]["step"])
            # First: a re-split the trainer refuses (another data config) costs no engine copy.
            states = reshard([(m["state"], user_tensors(t)) for m, t in old], world)
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            universal = sorted(n for n in engines
                               if to_universal(os.path.join(src, n), os.path.join(out, n)))
            for rank, (state, tensors) in enumerate(states):
                write_rank_files(out, rank, world, step,
                                 seeded_rng(_rank_seed(old[0][1]["rng.torch"], step, rank)),
                                 state, tensors)
            mgr.publish(out, conv, {"step": step, "world_size": world,
                                    "from_world_size": saved_world, "universal": universal})
        except Exception as e:  # noqa: BLE001 (re-raised on every rank below)
            error = f"{type(e).__name__}: {e}"
        finally:
            if mgr.remote and src:
                shutil.rmtree(src, ignore_errors=True)
            if error:  # a failed conversion leaves no partial copy of the engines behind
                shutil.rmtree(out, ignore_errors=True)
    patient_barrier()  # rank 0 converts alone: minutes at scale
    error = broadcast_object(error)
    if error:
        raise CheckpointUnusable(f"{storage.join(mgr.root, tag)}: converting it from world size "
                                 f"{saved_world} to {world} failed: {error}")
    return conv


def to_universal(engine_dir: str, out_dir: str) -> bool:
    """Convert one engine's DeepSpeed checkpoint directory to a universal one in `out_dir`;
    False (nothing written) when its optimizer state is not partitioned (ZeRO-0)."""
    if not glob.glob(os.path.join(engine_dir, "*optim_states.pt")):
        return False
    workers = str(max(1, min(4, (os.cpu_count() or 1) // 2)))
    # DeepSpeed's converter unpickles with weights_only=False; run it weights-only (safe_load).
    cmd = [sys.executable, "-m", "bdt.training.safe_load", "--input_folder",
           engine_dir, "--output_folder", out_dir, "--inject_missing_state",
           "--num_extract_workers", workers, "--num_merge_workers", workers]
    # Its own session: it and its extraction workers end together when this rank dies (safe_load).
    done = subprocess.run(cmd, capture_output=True, text=True, start_new_session=True,
                          env={**os.environ, PARENT_ENV: str(os.getpid())})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}: "
                           f"{(done.stderr or done.stdout)[-2000:]}")
    return True


def _verifies_here(mgr: CheckpointManager, conv: str) -> bool:
    """This process alone: whether a complete conversion `conv` exists and verifies."""
    if not storage.exists(storage.join(mgr.root, conv, MARKER)):
        return False
    local_dir = mgr.fetch_here(conv)
    try:
        files = mgr.read_marker(conv).get("files") or {}
        return bool(files) and not any(integrity.problem(local_dir, rel, entry)
                                       for rel, entry in files.items())
    except CheckpointUnusable:
        return False
    finally:
        if mgr.remote:
            shutil.rmtree(local_dir, ignore_errors=True)


def _rank_seed(old_rank0_torch_rng: torch.Tensor, step: int, rank: int) -> int:
    """A new rank's RNG seed: fixed by the run (its saved RNG), the step and the rank."""
    h = hashlib.sha256(old_rank0_torch_rng.numpy().tobytes())
    h.update(f"{step}/{rank}".encode())
    return int.from_bytes(h.digest()[:8], "little") >> 1


class universal_load:
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
