"""patient_barrier: ranks wait for one that works alone for longer than the process group's
timeout (a checkpoint conversion, a node's upload) without the run ending there."""

import json
import os
import subprocess
import time
from datetime import timedelta

import pytest
import torch.distributed as tdist

from bdt.training import distributed, patient_barrier as barriers
from bdt.training.distributed import free_port
from bdt.training.patient_barrier import open_patient_barriers, patient_barrier
from loopback_torchrun import TORCHRUN
from trainutil import loopback_gloo_group, rank_entry, spawn_ranks

TIMEOUT_S, ALONE_S = 2, 4  # the process group's timeout; how long rank 0 works alone


@rank_entry
def _rank(rank: int, world: int, port: int, out: str) -> None:
    loopback_gloo_group(rank, world, port, timeout=timedelta(seconds=TIMEOUT_S))
    barriers.PATIENT_BEAT_S = 0.2  # rank 0 works alone for many beats: alive, waited for
    open_patient_barriers()
    waited, plain = 0.0, "met"
    try:
        for _ in range(2):  # twice: each call has its own place on the store
            if rank == 0:
                time.sleep(ALONE_S)
            t0 = time.monotonic()
            patient_barrier()
            waited = max(waited, time.monotonic() - t0)
        box = ["from rank 0" if rank == 0 else None]
        tdist.broadcast_object_list(box, src=0)  # the group still works
        if rank == 0:
            time.sleep(ALONE_S)
        try:
            tdist.barrier()  # what the ranks met in before: it ends at the timeout
        except RuntimeError as e:
            plain = f"{type(e).__name__}: {e}"
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"waited": waited, "got": box[0], "plain": plain}, f)
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_ranks_wait_out_a_part_longer_than_the_timeout(tmp_path):
    spawn_ranks(_rank, (2, free_port(), str(tmp_path)), 2)
    got = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert got[1]["waited"] >= ALONE_S - 1 > TIMEOUT_S and got[0]["waited"] < TIMEOUT_S
    assert got[0]["got"] == got[1]["got"] == "from rank 0"
    assert "imed out" in got[1]["plain"] or "Timeout" in got[1]["plain"], got[1]["plain"]


@rank_entry
def _restarted_rank(rank: int, world: int, port: int, out: str) -> None:
    """Two attempts on one store, as a launcher that restarts the ranks (torchrun
    --max-restarts) keeps it: the second attempt's processes start bdt afresh."""
    import importlib

    from trainutil import _rank_env

    _rank_env(rank, world, port)
    waited = []
    for _attempt in range(2):
        fresh = importlib.reload(barriers)  # a new process's modules, the same store
        importlib.reload(distributed).init_distributed(use_deepspeed=False)
        if rank == 0:
            time.sleep(ALONE_S)
        t0 = time.monotonic()
        fresh.patient_barrier()
        waited.append(time.monotonic() - t0)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(waited, f)
    distributed.cleanup()


@pytest.mark.slow
def test_a_restarted_attempt_does_not_pass_on_the_keys_of_the_one_before(tmp_path):
    """The first attempt's opened keys let the second attempt's rank 1 through at once while
    rank 0 still worked alone (before it had converted the checkpoint, say)."""
    spawn_ranks(_restarted_rank, (2, free_port(), str(tmp_path)), 2)
    waited = json.loads((tmp_path / "rank1.json").read_text())
    assert min(waited) >= ALONE_S - 1, waited


NODE_RANK = """
import os, time
from bdt.training import distributed, patient_barrier as barriers

barriers.PATIENT_BEAT_S = 0.2
distributed.init_distributed(use_deepspeed=False)
if os.environ["RANK"] == "1":
    time.sleep(1)
    raise RuntimeError("rank 1 fails in its part")
barriers.patient_barrier()
"""


@pytest.mark.slow
def test_a_rank_that_stops_on_another_node_ends_the_wait(tmp_path):
    """Two nodes of one rank each (a torchrun per node): node 1's rank raises before the
    barrier and its torchrun ends, which node 0's does not hear of; node 0's rank waited for
    it for 24 h. Now its heartbeat's silence ends the wait with an error naming it."""
    script = tmp_path / "rank.py"
    script.write_text(NODE_RANK)
    port = free_port()
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--node_rank", str(n),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                               "--master_port", str(port), str(script)],
                              env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    try:
        out = [node.communicate(timeout=120)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert nodes[1].returncode != 0 and "rank 1 fails in its part" in out[1]
    assert nodes[0].returncode != 0 and "rank 1 stopped before reaching it" in out[0], out[0]


@rank_entry
def _ending_rank(rank: int, world: int, port: int, out: str) -> None:
    import threading

    from trainutil import _rank_env

    _rank_env(rank, world, port)
    distributed.init_distributed(use_deepspeed=False)
    beating = [t.name for t in threading.enumerate() if t.name == "bdt-patient-beat"]
    distributed.cleanup()
    left = [t.name for t in threading.enumerate() if t.name == "bdt-patient-beat"]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"beating": beating, "left": left}, f)


@pytest.mark.slow
def test_cleanup_ends_the_heartbeat_before_the_process_group(tmp_path):
    """The heartbeat thread slept out its beat and held the store (rank 0's: its server) past
    destroy_process_group, and could wake in the middle of the teardown."""
    spawn_ranks(_ending_rank, (2, free_port(), str(tmp_path)), 2)
    for r in (0, 1):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == {
            "beating": ["bdt-patient-beat"], "left": []}
