"""A checkpoint's per-rank state files: `rank_NNNNN.json` (step, world size, the trainer's state,
the JSON part of the RNG states) + `rank_NNNNN.safetensors` (tensors: RNG states, the trainer's
buffers under `user.`). RNG states of torch, numpy and python are split so that restoring them
unpickles nothing."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from bdt import storage
from bdt.training import integrity


def rank_file(rank: int, ext: str) -> str:
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


def write_rank_files(local_dir: str, rank: int, world_size: int, step: int,
                     rng: tuple[dict, dict[str, torch.Tensor]], state: dict,
                     tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Write this rank's JSON + safetensors files; returns their digests."""
    rng_meta, rng_tensors = rng
    meta = {"step": step, "rank": rank, "world_size": world_size, "rng": rng_meta, "state": state}
    flat = {**rng_tensors, **{f"user.{k}": v.contiguous() for k, v in tensors.items()}}
    out = {}
    for name, data in ((rank_file(rank, "json"), json.dumps(meta).encode()),
                       (rank_file(rank, "safetensors"), st_save(flat))):
        storage.write_bytes_atomic(os.path.join(local_dir, name), data)
        out[name] = integrity.digest_bytes(data)
    return out


def read_rank_files(local_dir: str, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    json_path = os.path.join(local_dir, rank_file(rank, "json"))
    if not os.path.exists(json_path):
        raise ValueError(f"checkpoint {local_dir} has no state for rank {rank} "
                         f"({rank_file(rank, 'json')} is missing): an incomplete copy?")
    with open(json_path, "rb") as f:
        meta = json.loads(f.read())
    with open(os.path.join(local_dir, rank_file(rank, "safetensors")), "rb") as f:
        tensors = st_load(f.read())
    wrong = _layout_problem(meta, tensors, rank)
    if wrong:  # before any engine loads: a foreign or hand-edited file, named
        raise ValueError(f"{rank_file(rank, 'json')}: {wrong}")
    return meta, tensors


def _layout_problem(meta: object, tensors: dict[str, torch.Tensor], rank: int) -> str | None:
    """What in a rank's files is not what write_rank_files writes; None if the layout fits."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    for key, kind in (("step", int), ("rank", int), ("world_size", int), ("rng", dict),
                      ("state", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f"{key!r} is {type(meta.get(key)).__name__}, not {kind.__name__}"
    if meta["rank"] != rank or meta["world_size"] < 1 or meta["step"] < 0:
        return (f"rank {meta['rank']}, world size {meta['world_size']}, step {meta['step']} "
                f"do not fit rank {rank}'s file")
    rng = meta["rng"]
    if not (isinstance(rng.get("numpy"), dict) and isinstance(rng.get("python"), dict)):
        return "its RNG state lacks the numpy or python part"
    missing = [k for k in ("rng.torch", "rng.numpy_keys") if k not in tensors]
    if missing:
        return f"{rank_file(rank, 'safetensors')} lacks {', '.join(missing)}"
    return None


def user_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("user."):]: v for k, v in tensors.items() if k.startswith("user.")}
