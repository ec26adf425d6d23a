"""A checkpoint's records checked before it loads (CheckpointLoader's before_load) refuse the
resume on every rank alike, even when the check fails on one rank only."""

import json
import os

import pytest
import torch

from bdt.training.checkpoint import CheckpointManager, tag_for
from bdt.training.distributed import free_port
from trainutil import rank_entry, spawn_ranks


@rank_entry
def _resume_refused_on_rank_1(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from bdt.training.distributed import init_distributed

    dist = init_distributed()
    mgr = CheckpointManager(root, dist)
    mgr.save(1, engines={}, rank_meta={"step": 1}, rank_tensors={"buf": torch.ones(2)})

    def check(where, state, marker):  # e.g. a shard listing that differs on this rank
        if rank == 1:
            raise ValueError(f"rank 1 refuses {os.path.basename(where)} at step {state['step']}")

    try:
        mgr.resume({}, before_load=check)
        got = "resumed"
    except Exception as e:  # noqa: BLE001 (recorded for the test to compare)
        got = f"{type(e).__name__}: {e}"
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(got, f)
    # No collective after this: the old code's rank 0 was still inside the resume's.


@pytest.mark.slow
def test_a_refusal_on_one_rank_is_every_ranks(tmp_path):
    """Before, rank 1 raised alone and rank 0 went on to verify the checkpoint, in a collective
    that rank 1 never joined: gloo failed it as a crashed peer, NCCL would hang."""
    spawn_ranks(_resume_refused_on_rank_1, (2, free_port(), str(tmp_path / "ck"), str(tmp_path)),
                2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got == [f"ValueError: rank 1 refuses {tag_for(1)} at step 1"] * 2
