"""Checkpoint manager semantics (marker, keep-last-N, newest complete, per-rank state, s3), a
2-rank DeepSpeed ZeRO-2 save/load that continues bitwise, and a 2 -> 1 rank load at ZeRO-0/1/3."""

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from bdt import storage
from bdt.trainer.checkpoint import MARKER, CheckpointManager, tag_for
from bdt.trainer.distributed import DistInfo, free_port

SOLO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _save(mgr, step, value=0.0):
    return mgr.save(step, engines={}, rank_meta={"step": step, "stream": {"epoch": 1, "offset": step}},
                    rank_tensors={"buf": torch.full((3,), value)},
                    shared={"ema": {"w": torch.full((2,), value)}})


def test_marker_newest_complete_and_prune(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ck"), SOLO, keep_last=2)
    assert mgr.latest_complete() is None
    for step in (10, 20, 30):
        _save(mgr, step)
    # keep_last=2: step 10 is gone, 20 and 30 complete.
    assert [(s, done) for s, _, done in mgr.list_tags()] == [(20, True), (30, True)]
    # A later save that died before its marker must be ignored by resume.
    os.makedirs(tmp_path / "ck" / tag_for(40))
    (tmp_path / "ck" / tag_for(40) / "rank_00000.json").write_text("{}")
    assert mgr.latest_complete() == tag_for(30)
    # The next complete save prunes the incomplete one and the oldest complete one.
    _save(mgr, 50)
    assert [(s, done) for s, _, done in mgr.list_tags()] == [(30, True), (50, True)]
    marker = json.loads((tmp_path / "ck" / tag_for(50) / MARKER).read_text())
    assert marker["step"] == 50 and marker["world_size"] == 1


def test_rank_state_and_rng_round_trip(tmp_path):
    mgr = CheckpointManager(str(tmp_path), SOLO, keep_last=0)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    _save(mgr, 7, value=1.5)
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)  # disturb every generator
    meta, tensors, shared = mgr.load(tag_for(7), engines={})
    assert meta == {"step": 7, "stream": {"epoch": 1, "offset": 7}}
    assert torch.equal(tensors["buf"], torch.full((3,), 1.5))
    assert torch.equal(shared["ema"]["w"], torch.full((2,), 1.5))
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]


def test_world_size_mismatch_is_a_clear_error(tmp_path):
    _save(CheckpointManager(str(tmp_path), SOLO), 3)
    other = CheckpointManager(str(tmp_path), DistInfo(1, 2, 1, torch.device("cpu")))
    with pytest.raises(ValueError, match="saved with world size 1, this run has 2"):
        other.load(tag_for(3), engines={})  # no reshard function: this state cannot be re-split


def test_world_change_converts_once_beside_the_checkpoint(tmp_path):
    """Saved by 2 ranks (no engines), loaded by 1: the reshard function sees both ranks' states
    in rank order, its result is written once to <tag>.w00001 (marker last) and reused; new
    ranks get seeded RNGs; pruning the checkpoint removes its conversion."""
    root = str(tmp_path / "ck")
    for rank in (0, 1):  # no process group: the two ranks' saves run one after the other
        CheckpointManager(root, DistInfo(rank, 2, rank, torch.device("cpu"))).save(
            4, {}, {"seen": rank + 1}, {"buf": torch.full((2,), float(rank))})
    calls = []

    def reshard(old, world):
        calls.append([state for state, _ in old])
        return [({"seen": sum(s["seen"] for s, _ in old)},
                 {"buf": torch.cat([t["buf"] for _, t in old])})] * world

    draws = []
    for _ in range(2):
        meta, tensors, _ = CheckpointManager(root, SOLO).load(tag_for(4), {}, reshard=reshard)
        assert meta == {"seen": 3} and torch.equal(tensors["buf"], torch.tensor([0., 0., 1., 1.]))
        draws.append(torch.rand(3))
    assert calls == [[{"seen": 1}, {"seen": 2}]]  # converted once, then read back
    assert torch.equal(draws[0], draws[1])
    conv = tmp_path / "ck" / f"{tag_for(4)}.w00001"
    marker = json.loads((conv / MARKER).read_text())
    assert (marker["world_size"], marker["from_world_size"], marker["universal"]) == (1, 2, [])
    mgr = CheckpointManager(root, SOLO, keep_last=1)
    _save(mgr, 5)
    assert sorted(os.listdir(tmp_path / "ck")) == [tag_for(5)]


def test_s3_checkpoint_marker_last_and_resume(s3_bucket, tmp_path):
    root = storage.join(s3_bucket, "run", "ck")
    mgr = CheckpointManager(root, SOLO, keep_last=1, staging_dir=str(tmp_path / "stage"))
    _save(mgr, 5, value=2.0)
    _save(mgr, 6, value=3.0)
    fs, path = storage.filesystem(root)
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path)] == [tag_for(6)]
    assert fs.exists(f"{path}/{tag_for(6)}/{MARKER}")
    assert not os.path.exists(tmp_path / "stage" / tag_for(6))  # staging cleaned after upload
    # Remove the marker: the checkpoint no longer counts.
    fs.rm(f"{path}/{tag_for(6)}/{MARKER}")
    assert mgr.latest_complete() is None
    storage.write_bytes_atomic(storage.join(root, tag_for(6), MARKER), b"{}")
    fresh = CheckpointManager(root, SOLO, staging_dir=str(tmp_path / "stage2"))
    meta, tensors, shared = fresh.load(fresh.latest_complete(), engines={})
    assert meta["step"] == 6 and torch.equal(tensors["buf"], torch.full((3,), 3.0))


# ---- real DeepSpeed engines on spawned CPU ranks -----------------------------------------------

def _join(rank, world, port):
    """One spawned rank: the launcher's environment, one thread, the process group."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from bdt.trainer.distributed import init_distributed

    return init_distributed()


def _tiny_engine(zero, world, micro_batch):
    from bdt.trainer.deepspeed_config import (DeepSpeedConfig, OptimConfig, build_ds_config,
                                              initialize_engine, make_schedule)

    optim = OptimConfig(lr=1e-2, warmup_steps=2)
    ds = build_ds_config(DeepSpeedConfig(zero_stage=zero, micro_batch_size=micro_batch), optim,
                         world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return initialize_engine(model, ds, make_schedule(optim, total_steps=10))


def _step(engine, x):
    loss = (engine(x) - x.sum(1, keepdim=True)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


def _worker(rank, world, port, root, out):
    from bdt.trainer.distributed import cleanup

    dist = _join(rank, world, port)

    def train(engine, steps):
        return [_step(engine, torch.randn(4, 8)) for _ in range(steps)]

    torch.manual_seed(100 + rank)
    engine = _tiny_engine(2, world, 4)
    train(engine, 3)
    mgr = CheckpointManager(root, dist, keep_last=2)
    mgr.save(3, {"model": engine}, rank_meta={"seen": 3 * 4})
    tail = train(engine, 3)
    params = [p.detach().clone() for p in engine.module.parameters()]
    engine2 = _tiny_engine(2, world, 4)
    meta, _, _ = mgr.load(mgr.resume_tag(), {"model": engine2})
    resumed = train(engine2, 3)
    params2 = [p.detach().clone() for p in engine2.module.parameters()]
    torch.save({"tail": tail, "resumed": resumed, "meta": meta, "lr": engine2.get_lr(),
                "same": all(torch.equal(a, b) for a, b in zip(params, params2))},
               os.path.join(out, f"r{rank}.pt"))
    cleanup()


def test_deepspeed_zero2_two_rank_save_resume_is_exact(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "ck"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        r = torch.load(tmp_path / f"r{rank}.pt", weights_only=True)
        assert r["meta"] == {"seen": 12}
        assert r["resumed"] == r["tail"]  # same losses after resume (RNG, Adam, LR restored)
        assert r["same"]
    assert os.path.exists(tmp_path / "ck" / tag_for(3) / MARKER)
    assert os.path.exists(tmp_path / "ck" / tag_for(3) / "rank_00001.json")


ZEROS = (0, 1, 3)  # ZeRO-2 goes through the training test (tests/train/test_world_size.py)


def _world_change_worker(rank, world, port, out):
    import deepspeed

    from bdt.trainer.distributed import cleanup

    dist = _join(rank, world, port)
    x_all = torch.randn(8, 8, generator=torch.Generator().manual_seed(7))  # the step after the save
    result = {}
    for zero in ZEROS:
        engine = _tiny_engine(zero, world, 8 // world)
        mgr = CheckpointManager(os.path.join(out, f"ck{zero}"), dist)
        if world == 2:  # train 3 steps, save, then take the reference step
            torch.manual_seed(100 + rank)
            for _ in range(3):
                _step(engine, torch.randn(4, 8))
            mgr.save(3, {"model": engine}, rank_meta={"seen": 12})
            _step(engine, x_all[rank * 4:(rank + 1) * 4])
        else:  # load on 1 rank, take the same step over the whole batch
            merged = lambda old, new_world: [({"seen": sum(s["seen"] for s, _ in old)}, {})]
            meta, _, _ = mgr.load(tag_for(3), {"model": engine}, reshard=merged)
            result[f"seen{zero}"] = meta["seen"]
            _step(engine, x_all)
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=zero == 3):
            result[f"params{zero}"] = [p.detach().clone() for p in params]
        result[f"lr{zero}"] = engine.get_lr()[0]
    if rank == 0:
        torch.save(result, os.path.join(out, f"world{world}.pt"))
    cleanup()


def test_engine_state_survives_world_size_change(tmp_path):
    """Saved on 2 ranks at ZeRO-0/1/3, loaded on 1 (converted automatically): the next step over
    the same global batch gives the 2-rank run's weights (to float reduction order). Lost Adam
    moments or LR would change the update (Adam's first step moves every weight by ~lr)."""
    for world in (2, 1):
        mp.spawn(_world_change_worker, args=(world, free_port(), str(tmp_path)), nprocs=world)
    two, one = (torch.load(tmp_path / f"world{w}.pt", weights_only=True) for w in (2, 1))
    for zero in ZEROS:
        assert one[f"seen{zero}"] == 24 and one[f"lr{zero}"] == two[f"lr{zero}"]
        for a, b in zip(one[f"params{zero}"], two[f"params{zero}"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (tmp_path / "ck1" / "step_000000003.w00001" / "model" / "zero").is_dir()
    assert not (tmp_path / "ck0" / "step_000000003.w00001" / "model").exists()  # ZeRO-0: as is
