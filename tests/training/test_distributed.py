"""init_distributed's rendezvous: what a one-machine job exposes to the network."""

import json
import os
import subprocess

import psutil
import pytest

from bdt.training import distributed
from bdt.training.distributed import free_port
from loopback_torchrun import TORCHRUN
from trainutil import loopback_gloo_group, rank_entry, spawn_ranks

LOOPBACK_IFNAME = next(name for name, addresses in psutil.net_if_addrs().items()
                       if any(a.address == "127.0.0.1" for a in addresses))


@rank_entry
def _rank(rank: int, world: int, port: int, init: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as tdist

    from bdt.training.distributed import cleanup, init_distributed

    if init == "tests' group":  # what test ranks that make their own process group use
        loopback_gloo_group(rank, world, port)
    else:
        init_distributed(use_deepspeed=init == "deepspeed")
    listening = sorted({c.laddr.ip for c in psutil.net_connections("inet")
                        if c.pid == os.getpid() and c.status == psutil.CONN_LISTEN})
    tdist.barrier()  # the group works over the store
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"listening": listening, "gloo": os.environ.get("GLOO_SOCKET_IFNAME")}, f)
    cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("init", ["torch", "deepspeed", "tests' group"])
def test_a_loopback_rendezvous_listens_on_loopback_only(tmp_path, init):
    """torch's rank-0 store listened on every interface ('::') whatever MASTER_ADDR said:
    unauthenticated, and gloo takes its peers' addresses from it. gloo's own sockets bind the
    address of the host's name (loopback on this machine, often external elsewhere) unless
    GLOO_SOCKET_IFNAME names the loopback interface."""
    spawn_ranks(_rank, (2, free_port(), init, str(tmp_path)), 2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["listening"] and set(got["listening"]) <= {"127.0.0.1"}, (rank, got)
        assert got["gloo"] == LOOPBACK_IFNAME, (rank, got)


@pytest.mark.parametrize("addr, preset, expected", [
    ("127.0.0.1", None, LOOPBACK_IFNAME),
    ("localhost", None, LOOPBACK_IFNAME),  # what `torchrun --standalone` gives its ranks
    ("::1", None, next(n for n, a in psutil.net_if_addrs().items()
                       if any(x.address == "::1" for x in a))),
    ("127.0.0.1", "eth7", "eth7"),  # the user's choice stays
    ("10.1.2.3", None, None),  # another machine's rank 0: a multi-node job is left as it was
    ("node-0", None, None),
])
def test_gloo_binds_loopback_only_for_a_loopback_master(monkeypatch, addr, preset, expected):
    monkeypatch.setenv("MASTER_ADDR", addr)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "unset")  # set first: restored after, not left "lo"
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    if preset:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", preset)
    distributed._gloo_on_loopback()
    assert os.environ.get("GLOO_SOCKET_IFNAME") == expected


LAUNCHED_RANK = """
import json, os, sys, psutil
from bdt.training.distributed import cleanup, init_distributed
init_distributed(use_deepspeed=False)
me = psutil.Process()  # its listeners, and those of its launcher (torchrun's agent and store)
listening = {c.laddr.ip for c in psutil.net_connections("inet")
             if c.pid in (me.pid, me.ppid()) and c.status == psutil.CONN_LISTEN}
with open(os.path.join(sys.argv[1], os.environ["RANK"] + ".json"), "w") as f:
    json.dump(sorted(listening), f)
cleanup()
"""


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", [["--standalone"], ["--master-addr", "127.0.0.1"]])
def test_the_tests_torchrun_listens_on_loopback_only(tmp_path, rendezvous):
    """torchrun's agent store listens on every interface ('::') whatever its rendezvous says;
    the tests launch it through loopback_torchrun, whose store listens on 127.0.0.1."""
    script = tmp_path / "rank.py"
    script.write_text(LAUNCHED_RANK)
    port = [] if "--standalone" in rendezvous else ["--master-port", str(free_port())]
    subprocess.run([*TORCHRUN, *rendezvous, *port, "--nproc-per-node", "2", str(script),
                    str(tmp_path)], check=True, timeout=120, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    for rank in (0, 1):
        listening = json.loads((tmp_path / f"{rank}.json").read_text())
        assert listening and set(listening) <= {"127.0.0.1"}, (rank, listening)
