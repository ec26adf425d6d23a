"""init_distributed's rendezvous: what a one-machine job exposes to the network."""

import json
import os

import psutil
import pytest

from bdt.training.distributed import free_port
from trainutil import rank_entry, spawn_ranks


@rank_entry
def _rank(rank: int, world: int, port: int, use_deepspeed: bool, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as tdist

    from bdt.training.distributed import cleanup, init_distributed

    init_distributed(use_deepspeed=use_deepspeed)
    listening = sorted({c.laddr.ip for c in psutil.net_connections("inet")
                        if c.pid == os.getpid() and c.status == psutil.CONN_LISTEN})
    tdist.barrier()  # the group works over the store
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(listening, f)
    cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("use_deepspeed", [False, True])
def test_a_loopback_rendezvous_listens_on_loopback_only(tmp_path, use_deepspeed):
    """torch's rank-0 store listened on every interface ('::') whatever MASTER_ADDR said:
    unauthenticated, and gloo takes its peers' addresses from it."""
    spawn_ranks(_rank, (2, free_port(), use_deepspeed, str(tmp_path)), 2)
    for rank in (0, 1):
        listening = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert listening and set(listening) <= {"127.0.0.1"}, (rank, listening)
