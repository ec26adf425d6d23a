"""A rank whose collective fails because another rank ended (its error, a kill, a lost node) ends
with one line that says so, not a transport traceback: with every surviving rank printing one,
the log ended on them and buried the one error that said why."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import bdt.train
from bdt.training.distributed import free_port, lost_peer_line
from bdt.training.patient_barrier import RankGone
from bdt.training.tokenizer import loop as tokenizer_loop
from testkit import REPO

# Two gloo ranks: rank 0 leaves after the first barrier, rank 1's next collective fails.
PEERS = """
import os, sys, time
import torch, torch.distributed as dist
from bdt.training.distributed import lost_peer_line
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=rank,
                        world_size=2)
dist.barrier()
if rank == 0:
    time.sleep(0.5)
    os._exit(2)
try:
    dist.all_reduce(torch.ones(3))
except RuntimeError as e:
    print(lost_peer_line(e))
"""


@pytest.mark.slow
def test_gloos_error_after_a_rank_ended_reads_as_a_lost_peer():
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=str(REPO), WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo")
    ranks = [subprocess.Popen([sys.executable, "-c", PEERS, port], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in ranks]
    assert ranks[0].returncode == 2
    assert outs[1].startswith("rank 1 of 2: another rank ended while this one waited for it ("), \
        outs[1]
    assert "that rank's own error" in outs[1]


def test_other_errors_and_a_world_of_one_are_not_a_lost_peer(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert lost_peer_line(RuntimeError("shape mismatch: [4] vs [5]")) is None
    assert lost_peer_line(OSError("Connection reset by peer")) is None  # a store's, named there
    gone = RankGone("patient_barrier: rank 0 stopped before reaching it")
    assert "(patient_barrier: rank 0 stopped before reaching it)" in lost_peer_line(gone)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert lost_peer_line(RuntimeError("Connection closed by peer")) is None


@pytest.mark.parametrize("trainer", ["ar", "tokenizer"])
def test_each_trainer_ends_on_one_line(monkeypatch, capsys, tmp_path, trainer):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    cfg = SimpleNamespace(run_dir=str(tmp_path / "run"))

    def lose_a_peer(*_):
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:7584. This is "
                           "typically caused by a remote worker crashing.\nmore lines")

    if trainer == "ar":
        monkeypatch.setattr(bdt.train, "load_config", lambda _: cfg)
        monkeypatch.setattr(bdt.train, "train", lose_a_peer)
        main = bdt.train.main
    else:
        monkeypatch.setattr(tokenizer_loop, "load_command", lambda _: (cfg, False))
        monkeypatch.setattr(tokenizer_loop, "train", lose_a_peer)
        main = tokenizer_loop.main
    with pytest.raises(SystemExit) as ended:
        main([])
    assert ended.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: rank 3 of 4: another rank ended while this one waited for it ([pair.cc:553] "
        "Connection closed by peer [127.0.0.1]:7584. This is typically caused"), err
    # any other RuntimeError keeps its traceback
    monkeypatch.setattr(bdt.train if trainer == "ar" else tokenizer_loop, "train",
                        lambda *_: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main([])
