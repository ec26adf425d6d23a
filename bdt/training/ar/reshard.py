"""Resuming an AR training run on another number of ranks, and the consumed-sample log that
checks it.

A checkpoint holds one DeepSpeed engine and one state file per rank (bdt/training/checkpoint.py).
When the run restarts with W' != W ranks, rank 0 converts it once (CheckpointManager.load(...,
reshard=)): the engine becomes a DeepSpeed universal checkpoint
(bdt/training/checkpoint_convert.py), and
  * the per-rank training state (`resplit_train_states`): the step, stage and LR position are
    the same on every rank; the tokens/images counters are summed into new rank 0 (the logs
    report sums over ranks); the data stream of the checkpoint's stage is re-split exactly
    (bdt/data/stream_state.py: no sample repeated or skipped).
Training then continues at the saved step (LR schedules count steps, not ranks). Losses are not
bitwise those of an uninterrupted run: the ranks see other samples in other micro-batches.

`SampleKeyLog` (logging.sample_keys: true) writes every consumed sample key per rank and step,
so a test (or a suspicious user) can check the union over ranks and restarts against an epoch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import torch

from bdt.data.shard_source import ShardList
from bdt.data.stream_state import resplit
from bdt.training.metrics import cut_records_after

STREAM_PREFIX = "stream."  # the loop saves the stream's tensors under this prefix


def resplit_train_states(shards_of_stage: Callable[[int], ShardList],
                         seed_of_stage: Callable[[int], int]):
    """The `reshard` function of the AR loop's per-rank state (checkpoint_state.py's layout).
    A stage's manifest counts (ShardList.samples) spare reading its owed shards to count them."""

    def reshard(old: list[tuple[dict, dict[str, torch.Tensor]]], world: int):
        first = old[0][0]
        for rank, (state, _) in enumerate(old):
            if (state["step"], state["stage"]) != (first["step"], first["stage"]):
                raise ValueError(f"checkpoint ranks disagree: rank {rank} is at step "
                                 f"{state['step']} stage {state['stage']}, rank 0 at "
                                 f"{first['step']} stage {first['stage']}")
        stage = int(first["stage"])
        shards = shards_of_stage(stage)
        streams = resplit([(s["stream"], _unprefixed(t)) for s, t in old], shards.urls,
                          seed_of_stage(stage), world, shards.samples)
        seen_total = {k: sum(s["seen"][k] for s, _ in old) for k in first["seen"]}
        out = []
        for rank, (stream_meta, stream_tensors) in enumerate(streams):
            # the log window's sums are per old rank: the new ranks start their windows afresh
            state = {**first, "stream": stream_meta, "resplit_from_world_size": len(old),
                     "log_window": None,
                     "seen": seen_total if rank == 0 else {k: 0 for k in seen_total}}
            out.append((state, {STREAM_PREFIX + k: v for k, v in stream_tensors.items()}))
        return out

    return reshard


def _unprefixed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(STREAM_PREFIX):]: v for k, v in tensors.items() if k.startswith(STREAM_PREFIX)}


class SampleKeyLog:
    """Appends {"step", "rank", "world_size", "keys"} per micro-batch to
    <run_dir>/sample_keys/rank_NNNNN.jsonl (one line each, flushed: a kill loses no line).

    keep_through_step: the step this run continues from (-1 for a fresh start). The steps an
    interrupted launch logged past it are trained again, so their records go, as in
    metrics.jsonl: each rank cuts its own file and rank 0 those of ranks a smaller world no
    longer has; the union over the files is then every consumed key once."""

    def __init__(self, run_dir: str, rank: int, world_size: int, keep_through_step: int):
        folder = os.path.join(run_dir, "sample_keys")
        os.makedirs(folder, exist_ok=True)
        self.rank, self.world_size = rank, world_size
        mine = os.path.join(folder, f"rank_{rank:05d}.jsonl")
        if rank == 0:
            for name in os.listdir(folder):
                match = re.fullmatch(r"rank_(\d+)\.jsonl", name)
                if match and int(match.group(1)) >= world_size:
                    cut_records_after(os.path.join(folder, name), keep_through_step)
        cut_records_after(mine, keep_through_step)
        self.file = open(mine, "a", buffering=1)

    def add(self, step: int, keys: list[str]) -> None:
        self.file.write(json.dumps({"step": step, "rank": self.rank,
                                    "world_size": self.world_size, "keys": keys}) + "\n")

    def close(self) -> None:
        self.file.close()
