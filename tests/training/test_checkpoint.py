"""Checkpoint manager semantics (marker, keep-last-N, newest complete, per-rank state, s3), a
2-rank DeepSpeed ZeRO-2 save/load that continues bitwise, and a 2 -> 1 rank load at ZeRO-0/1/3."""

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import tempfile

import numpy as np
import pytest
import torch

from bdt import storage
from bdt.training.checkpoint import MARKER, CheckpointManager, tag_for
from bdt.training.distributed import DistInfo, free_port
from bdt.training.integrity import digest
from testkit import PlantedPickle, cut_file, flip_bytes
from trainutil import rank_entry, spawn_ranks

SOLO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _save(mgr, step, value=0.0):
    return mgr.save(step, engines={}, rank_meta={"step": step, "stream": {"epoch": 1, "offset": step}},
                    rank_tensors={"buf": torch.full((3,), value)},
                    shared={"ema": {"w": torch.full((2,), value)}})


def test_a_fresh_start_beside_complete_checkpoints_is_refused(tmp_path):
    """checkpoint.resume=false trained from step 0 beside an earlier run's checkpoints; its next
    restart resumed their newest: another run's weights, with this run's log cut around them."""
    mgr = CheckpointManager(str(tmp_path / "ck"), SOLO)
    assert mgr.resume(engines={}, fresh=True) is None  # nothing there
    os.makedirs(tmp_path / "ck" / tag_for(40))  # an unfinished save is no checkpoint to resume
    assert mgr.resume(engines={}, fresh=True) is None
    _save(mgr, 60)
    with pytest.raises(ValueError, match=rf"checkpoint.resume=false, but .*ck holds complete "
                                         rf"checkpoints \(newest {tag_for(60)}\)"):
        CheckpointManager(str(tmp_path / "ck"), SOLO).resume(engines={}, fresh=True)
    assert CheckpointManager(str(tmp_path / "ck"), SOLO).resume(engines={}).tag == tag_for(60)


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


def test_other_engine_settings_are_a_clear_error_not_damage(tmp_path):
    """A checkpoint written under another ZeRO stage (DeepSpeed fails on it with an empty
    AssertionError) is refused by name, before loading, without passing over to older ones."""
    zero2 = {"deepspeed.zero_stage": 2, "deepspeed.precision": "fp32"}
    _save(CheckpointManager(str(tmp_path), SOLO, settings=zero2), 3)
    assert CheckpointManager(str(tmp_path), SOLO, settings=zero2).resume(engines={}).tag == tag_for(3)
    zero3 = CheckpointManager(str(tmp_path), SOLO, settings={**zero2, "deepspeed.zero_stage": 3})
    with pytest.raises(ValueError, match=r"step_000000003 was written with deepspeed.zero_stage=2; "
                                         r"this run has deepspeed.zero_stage=3"):
        zero3.resume(engines={})


def test_world_change_converts_once_beside_the_checkpoint(tmp_path):
    """Saved by 2 ranks (no engines), loaded by 1: the reshard function sees both ranks' states
    in rank order, its result is written once to <tag>.w00001 (marker last) and reused; new
    ranks get seeded RNGs; pruning the checkpoint removes its conversion."""
    root = str(tmp_path / "ck")
    for rank in (0, 1):  # no process group: the two ranks' saves run one after the other
        CheckpointManager(root, DistInfo(rank, 2, rank, torch.device("cpu"))).save(
            4, {}, {"seen": rank + 1}, {"buf": torch.full((2,), float(rank))})
    # Rank 1 saved after rank 0's marker: list its files there, as a gathered save does.
    marker_path = tmp_path / "ck" / tag_for(4) / MARKER
    marker = json.loads(marker_path.read_text())
    for name in ("rank_00001.json", "rank_00001.safetensors"):
        marker["files"][name] = digest(str(tmp_path / "ck" / tag_for(4) / name))
    marker_path.write_text(json.dumps(marker))
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


def test_a_refused_re_split_converts_no_engine_and_leaves_nothing(tmp_path, monkeypatch):
    """The trainer's re-split refuses a changed data config: that is found before the engines'
    universal conversion (minutes per checkpoint for a real model), and no partial conversion
    (a copy of the optimizer state) is left beside the checkpoint."""
    from bdt.training import checkpoint_convert
    from bdt.training.integrity import CheckpointUnusable

    root = tmp_path / "ck"
    for rank in (0, 1):
        CheckpointManager(str(root), DistInfo(rank, 2, rank, torch.device("cpu"))).save(
            4, {}, {"seen": rank + 1}, {"buf": torch.zeros(2)})
    converted = []
    monkeypatch.setattr(checkpoint_convert, "to_universal", lambda *a: converted.append(a))

    def reshard(old, world):
        raise ValueError("re-split needs the same data config")

    with pytest.raises(CheckpointUnusable, match="re-split needs the same data config"):
        CheckpointManager(str(root), SOLO).load(tag_for(4), {"model": None}, reshard=reshard)
    assert converted == [] and sorted(os.listdir(root)) == [tag_for(4)]


# A world of one is its node's only rank whatever LOCAL_RANK says (a stray one in the shell, or
# picking a GPU): with LOCAL_RANK=3 it skipped every node's-first-rank duty, the upload and the
# download of an s3:// checkpoint included, and the save failed.
STRAY_LOCAL_RANK = DistInfo(rank=0, world_size=1, local_rank=3, device=torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("solo", [SOLO, STRAY_LOCAL_RANK], ids=["solo", "stray-local-rank"])
def test_s3_checkpoint_marker_last_and_resume(s3_bucket, tmp_path, solo):
    root = storage.join(s3_bucket, "run", "ck")
    mgr = CheckpointManager(root, solo, keep_last=1, staging_dir=str(tmp_path / "stage"))
    _save(mgr, 5, value=2.0)
    _save(mgr, 6, value=3.0)
    fs, path = storage.filesystem(root)
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path)] == [tag_for(6)]
    assert fs.exists(f"{path}/{tag_for(6)}/{MARKER}")
    assert not os.path.exists(tmp_path / "stage" / tag_for(6))  # staging cleaned after upload
    # Remove the marker: the checkpoint no longer counts.
    marker = fs.cat_file(f"{path}/{tag_for(6)}/{MARKER}")
    fs.rm(f"{path}/{tag_for(6)}/{MARKER}")
    assert mgr.latest_complete() is None
    storage.write_bytes_atomic(storage.join(root, tag_for(6), MARKER), marker)
    fresh = CheckpointManager(root, solo, staging_dir=str(tmp_path / "stage2"))
    resumed = fresh.resume(engines={})
    assert resumed.meta["step"] == 6 and torch.equal(resumed.tensors["buf"], torch.full((3,), 3.0))
    assert not resumed.skipped


def test_s3_a_marker_the_store_cannot_serve_is_raised_not_passed_over(s3_bucket, tmp_path,
                                                                     monkeypatch):
    """A stalled store timing out on markers said nothing about the checkpoints: resume passed
    over every good one, then raised "no usable checkpoint" (a ValueError, which the resume
    wrapper takes for a config error and does not retry); one it did reach was later moved to
    unusable/ by the save of the same step."""
    import s3fs

    root = storage.join(s3_bucket, "run", "ck")
    mgr = CheckpointManager(root, SOLO, keep_last=2, staging_dir=str(tmp_path / "stage"))
    for step in (1, 2):
        _save(mgr, step, value=float(step))
    real_open = s3fs.S3FileSystem._open

    def stalled(self, path, mode="rb", **kwargs):
        if path.endswith(MARKER) and mode == "rb":
            raise TimeoutError(errno.ETIMEDOUT, "Read timeout on endpoint URL")
        return real_open(self, path, mode=mode, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_open", stalled)
    with pytest.raises(TimeoutError, match=f"{root}/{tag_for(2)}/{MARKER}: .*Read timeout"):
        mgr.resume(engines={})
    assert not mgr.passed_over
    monkeypatch.undo()
    resumed = mgr.resume(engines={})
    assert resumed.tag == tag_for(2) and not resumed.skipped


@pytest.mark.slow
def test_s3_roots_never_share_staging_and_a_lost_upload_publishes_no_marker(s3_bucket, tmp_path,
                                                                            monkeypatch):
    """s3://b/exp-1/ck and s3://b/exp_1/ck once staged into one folder: one run's save deleted
    the other's files before upload, which then wrote a marker over nothing and pruned its last
    good checkpoint."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the default staging folders
    roots = [storage.join(s3_bucket, run, "ck") for run in ("exp-1", "exp_1")]
    first, second = (CheckpointManager(r, SOLO, keep_last=1) for r in roots)
    assert first.staging != second.staging
    _save(first, 1)

    def lose_the_files():  # another run emptying the staging folder before the upload
        shutil.rmtree(os.path.join(first.staging, tag_for(2)))
        os.makedirs(os.path.join(first.staging, tag_for(2)))

    with pytest.raises(OSError, match="did not reach the store .* no marker written"):
        first.save(2, engines={}, rank_meta={"step": 2}, before_marker=lose_the_files)
    assert first.latest_complete() == tag_for(1)  # not pruned for a checkpoint of nothing
    assert not os.path.exists(os.path.join(first.staging, tag_for(2)))  # no staged copy left


@pytest.mark.slow
def test_s3_staging_folder_bdt_made_goes_once_empty(s3_bucket, tmp_path, monkeypatch):
    """Every save and resume of an s3 root left its empty folder in <tempdir>/bdt-ckpt-staging
    (one per root, forever); a folder the config names is the user's and stays."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = storage.join(s3_bucket, "run", "ck")
    mgr = CheckpointManager(root, SOLO, keep_last=2)
    os.makedirs(os.path.join(mgr.staging, tag_for(9)))  # a staged copy some earlier save left
    _save(mgr, 1, value=1.0)
    assert os.listdir(mgr.staging) == [tag_for(9)]  # not empty: kept
    os.rmdir(os.path.join(mgr.staging, tag_for(9)))
    _save(mgr, 2, value=2.0)
    assert os.listdir(tmp_path / "bdt-ckpt-staging") == []
    assert CheckpointManager(root, SOLO).resume(engines={}).tag == tag_for(2)
    assert os.listdir(tmp_path / "bdt-ckpt-staging") == []
    named = CheckpointManager(root, SOLO, staging_dir=str(tmp_path / "mine"))
    _save(named, 3, value=3.0)
    assert named.resume(engines={}).tag == tag_for(3)
    assert os.listdir(tmp_path / "mine") == []


@pytest.mark.slow
def test_s3_an_endpoint_dying_mid_upload_is_named_and_leaves_no_complete_checkpoint(
        s3_stoppable, tmp_path, monkeypatch):
    """The endpoint dies once the first object of a checkpoint is up. Before: botocore's
    EndpointConnectionError (no OSError) ended the trainer with a long traceback. Now an OSError
    names the checkpoint and what was done; the marker, last, is not there, so once the store
    is back the half-uploaded step is no checkpoint and resume takes the one before."""
    import s3fs

    root = storage.join(s3_stoppable.bucket, "run", "ck")
    mgr = CheckpointManager(root, SOLO, keep_last=2, staging_dir=str(tmp_path / "stage"))
    _save(mgr, 1, value=1.0)
    real_put = s3fs.S3FileSystem._put_file

    async def put_then_die(self, lpath, rpath, **kwargs):
        await real_put(self, lpath, rpath, **kwargs)
        s3_stoppable.stop()

    with monkeypatch.context() as patch:
        patch.setattr(s3fs.S3FileSystem, "_put_file", put_then_die)
        s3fs.S3FileSystem.clear_instance_cache()  # a filesystem binds its sync methods when made
        with pytest.raises(OSError, match=rf"^saving checkpoint {root}/{tag_for(2)}: "
                                          rf"EndpointConnectionError: .*{s3_stoppable.port}"):
            _save(mgr, 2, value=2.0)
    s3fs.S3FileSystem.clear_instance_cache()
    assert os.listdir(tmp_path / "stage") == []  # its staged copy went: nothing retries it
    s3_stoppable.start()
    fs, path = storage.filesystem(root)
    fs.invalidate_cache()
    assert fs.find(f"{path}/{tag_for(2)}")  # some of it reached the store
    assert [(s, done) for s, _, done in mgr.list_tags()] == [(1, True), (2, False)]
    resumed = CheckpointManager(root, SOLO, staging_dir=str(tmp_path / "again")).resume(engines={})
    assert resumed.tag == tag_for(1) and not resumed.skipped


def test_s3_listing_and_fetching_checkpoints_of_a_dead_endpoint_is_named(s3_stoppable, tmp_path):
    """Listing a root and downloading a checkpoint when the endpoint is gone: one OSError
    naming the URL and what was done (botocore's error is no OSError: it passed every handler
    and ended the trainer, or the resume wrapper's listing, with a traceback)."""
    from bdt.training.checkpoint_store import download_dir, list_checkpoints

    root = storage.join(s3_stoppable.bucket, "run", "ck")
    _save(CheckpointManager(root, SOLO, staging_dir=str(tmp_path / "stage")), 1, value=1.0)
    s3_stoppable.stop()
    with pytest.raises(OSError, match=rf"^listing checkpoints in {root}: EndpointConnectionError"):
        list_checkpoints(root)
    with pytest.raises(OSError, match=rf"^downloading checkpoint {root}/{tag_for(1)}: "
                                      rf"EndpointConnectionError"):
        download_dir(f"{root}/{tag_for(1)}", str(tmp_path / "fetched"))


def test_marker_lists_every_file_and_resume_falls_back_past_damage(tmp_path, caplog):
    root = tmp_path / "ck"
    mgr = CheckpointManager(str(root), SOLO, keep_last=0)
    for step in (1, 2, 3, 4):
        _save(mgr, step, value=float(step))
    ck4 = root / tag_for(4)
    marker = json.loads((ck4 / MARKER).read_text())
    on_disk = sorted(p.relative_to(ck4).as_posix() for p in ck4.rglob("*")
                     if p.is_file() and p.name != MARKER)
    assert sorted(marker["files"]) == on_disk == ["rank_00000.json", "rank_00000.safetensors",
                                                   "shared.pt"]
    for rel, entry in marker["files"].items():
        data = (ck4 / rel).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    flip_bytes(ck4 / "rank_00000.safetensors")
    cut_file(root / tag_for(3) / "shared.pt")
    flip_bytes(root / tag_for(2) / "rank_00000.json", n=1)
    resumed = mgr.resume(engines={})
    assert resumed.tag == tag_for(1) and torch.equal(resumed.tensors["buf"], torch.full((3,), 1.0))
    assert [r.split(": ", 2)[:2] for r in resumed.skipped] == [
        [str(ck4), "rank_00000.safetensors"], [str(root / tag_for(3)), "shared.pt"],
        [str(root / tag_for(2)), "rank_00000.json"]]
    assert "sha256 differs" in resumed.skipped[0] and "truncated" in resumed.skipped[1]
    assert caplog.text.count("checkpoint skipped: ") == 3
    caplog.clear()
    # Nothing is deleted: saving step 2 again moves the damaged step 2 aside, and pruning
    # (keep_last 1) looks only at steps up to 2, so the damaged 3 and 4 stay for inspection.
    mgr.keep_last = 1
    _save(mgr, 2, value=9.0)
    assert sorted(p.name for p in root.iterdir()) == [tag_for(2), tag_for(3), tag_for(4), "unusable"]
    moved = list((root / "unusable").glob(f"*/{tag_for(2)}/rank_00000.json"))
    assert len(moved) == 1 and "moved to" in caplog.text
    assert mgr.resume(engines={}).tag == tag_for(2)


def test_a_checkpoint_passed_over_does_not_count_toward_keep_last(tmp_path):
    """keep_last 2 after resuming past a damaged step 7: step 8 is saved, and the good step 6
    stays beside it (the damaged 7 is kept for inspection but is not one of the two)."""
    root = tmp_path / "ck"
    mgr = CheckpointManager(str(root), SOLO, keep_last=2)
    for step in (6, 7):
        _save(mgr, step)
    flip_bytes(root / tag_for(7) / "shared.pt")
    assert mgr.resume(engines={}).tag == tag_for(6)
    _save(mgr, 8)
    assert [tag for _, tag, _ in mgr.list_tags()] == [tag_for(6), tag_for(7), tag_for(8)]
    _save(mgr, 9)
    assert [tag for _, tag, _ in mgr.list_tags()] == [tag_for(7), tag_for(8), tag_for(9)]


def test_no_usable_checkpoint_is_an_error_naming_each(tmp_path):
    root = tmp_path / "ck"
    mgr = CheckpointManager(str(root), SOLO, keep_last=0)
    for step in (1, 2):
        _save(mgr, step)
    (root / tag_for(2) / "rank_00000.json").unlink()
    (root / tag_for(1) / MARKER).write_text('{"step": 1, "files": {"x')  # a damaged marker
    with pytest.raises(ValueError, match="no usable checkpoint") as err:
        mgr.resume(engines={})
    assert f"{root / tag_for(2)}: rank_00000.json: missing" in str(err.value)
    assert f"{root / tag_for(1)}: its COMPLETE marker cannot be read" in str(err.value)
    assert sorted(p.name for p in root.iterdir()) == [tag_for(1), tag_for(2)]


def test_a_planted_pickle_is_refused_not_run(tmp_path):
    """An attacker who can write the checkpoint directory replaces shared.pt and fixes the
    marker's hash: the pickle scan refuses it and resume falls back; DeepSpeed's own loader
    and its universal converter refuse such a file too (weights-only), creating nothing."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from bdt.training.checkpoint_convert import to_universal
    from bdt.training.safe_load import weights_only_loads

    target = tmp_path / "pwned"
    root = tmp_path / "ck"
    mgr = CheckpointManager(str(root), SOLO, keep_last=0)
    for step in (1, 2):
        _save(mgr, step, value=float(step))
    evil = root / tag_for(2) / "shared.pt"
    torch.save({"ema": PlantedPickle(str(target))}, evil)
    marker = json.loads((root / tag_for(2) / MARKER).read_text())
    marker["files"]["shared.pt"] = {"bytes": evil.stat().st_size,
                                    "sha256": hashlib.sha256(evil.read_bytes()).hexdigest()}
    (root / tag_for(2) / MARKER).write_text(json.dumps(marker))
    resumed = mgr.resume(engines={})
    assert resumed.tag == tag_for(1) and "io.open" in resumed.skipped[0]
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError, match="io.open"):
        TorchCheckpointEngine().load(str(evil))  # DeepSpeed's: torch.load(weights_only=False)
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        shutil.copy(evil, engine_dir / name)
    with pytest.raises(RuntimeError, match="Weights only load failed"):
        to_universal(str(engine_dir), str(tmp_path / "universal"))
    assert not target.exists()
    torch.load(evil, weights_only=False)  # the control: an unsafe load does run it
    assert target.exists()


@pytest.mark.slow
def test_s3_damage_falls_back_and_is_set_aside(s3_bucket, tmp_path):
    root = storage.join(s3_bucket, "run", "ck")
    mgr = CheckpointManager(root, SOLO, keep_last=2, staging_dir=str(tmp_path / "stage"))
    for step in (1, 2, 3):
        _save(mgr, step, value=float(step))
    fs, path = storage.filesystem(root)
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path)] == [tag_for(2), tag_for(3)]
    victim = f"{path}/{tag_for(3)}/rank_00000.safetensors"
    fs.pipe_file(victim, fs.cat_file(victim)[:-10])  # truncated on the object store
    resumed = mgr.resume(engines={})
    assert resumed.tag == tag_for(2) and torch.equal(resumed.tensors["buf"], torch.full((3,), 2.0))
    assert resumed.skipped == [f"{root}/{tag_for(3)}: rank_00000.safetensors: "
                               f"{fs.size(victim)} bytes, the marker says {fs.size(victim) + 10} "
                               f"(truncated or replaced)"]
    _save(mgr, 3, value=4.0)  # the damaged step 3 is moved aside, not overwritten
    fs.invalidate_cache()
    assert len(fs.glob(f"{path}/unusable/*/{tag_for(3)}/rank_00000.safetensors")) == 1
    assert mgr.resume(engines={}).tag == tag_for(3)


# ---- real DeepSpeed engines on spawned CPU ranks -----------------------------------------------

def _join(rank, world, port):
    """One spawned rank: the launcher's environment, one thread, the process group."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from bdt.training.distributed import init_distributed

    return init_distributed()


def _tiny_engine(zero, world, micro_batch):
    from bdt.training.deepspeed_config import (DeepSpeedConfig, OptimConfig, build_ds_config,
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


@rank_entry
def _worker(rank, world, port, root, out):
    from bdt.training.distributed import cleanup

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
    meta = mgr.resume({"model": engine2}).meta
    resumed = train(engine2, 3)
    params2 = [p.detach().clone() for p in engine2.module.parameters()]
    torch.save({"tail": tail, "resumed": resumed, "meta": meta, "lr": engine2.get_lr(),
                "same": all(torch.equal(a, b) for a, b in zip(params, params2))},
               os.path.join(out, f"r{rank}.pt"))
    cleanup()


@pytest.mark.slow
def test_deepspeed_zero2_two_rank_save_resume_is_exact(tmp_path):
    spawn_ranks(_worker, (2, free_port(), str(tmp_path / "ck"), str(tmp_path)), 2)
    for rank in range(2):
        r = torch.load(tmp_path / f"r{rank}.pt", weights_only=True)
        assert r["meta"] == {"seen": 12}
        assert r["resumed"] == r["tail"]  # same losses after resume (RNG, Adam, LR restored)
        assert r["same"]
    assert os.path.exists(tmp_path / "ck" / tag_for(3) / MARKER)
    assert os.path.exists(tmp_path / "ck" / tag_for(3) / "rank_00001.json")


ZEROS = (0, 1, 3)  # ZeRO-2 goes through the training test (tests/training/ar/test_world_size.py)


@rank_entry
def _world_change_worker(rank, world, port, out):
    import deepspeed

    from bdt.training.distributed import cleanup

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


@pytest.mark.slow
def test_engine_state_survives_world_size_change(tmp_path):
    """Saved on 2 ranks at ZeRO-0/1/3, loaded on 1 (converted automatically): the next step over
    the same global batch gives the 2-rank run's weights (to float reduction order). Lost Adam
    moments or LR would change the update (Adam's first step moves every weight by ~lr)."""
    for world in (2, 1):
        spawn_ranks(_world_change_worker, (world, free_port(), str(tmp_path)), world)
    two, one = (torch.load(tmp_path / f"world{w}.pt", weights_only=True) for w in (2, 1))
    for zero in ZEROS:
        assert one[f"seen{zero}"] == 24 and one[f"lr{zero}"] == two[f"lr{zero}"]
        for a, b in zip(one[f"params{zero}"], two[f"params{zero}"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (tmp_path / "ck1" / "step_000000003.w00001" / "model" / "zero").is_dir()
    assert not (tmp_path / "ck0" / "step_000000003.w00001" / "model").exists()  # ZeRO-0: as is


@pytest.mark.slow
def test_the_converter_dies_with_the_rank_that_started_it(tmp_path):
    """A rank SIGKILLed (the OOM killer's pick) while it converts a checkpoint for another world
    size takes the converter with it: an orphan would go on writing the conversion that the
    next launch rebuilds in the same place. The engine files are FIFOs: it would block forever."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    engine = tmp_path / "engine"
    engine.mkdir()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        os.mkfifo(engine / name)
    rank = subprocess.Popen([sys.executable, "-c", "from bdt.training.checkpoint_convert import "
                             f"to_universal; to_universal({str(engine)!r}, {str(tmp_path / 'u')!r})"])
    converter, cpu, deadline = [], None, time.monotonic() + 120
    while True:  # until the converter waits on a FIFO (idle): it writes nothing more to its pipes
        assert rank.poll() is None and time.monotonic() < deadline
        converter = converter or psutil.Process(rank.pid).children()
        if converter and cpu == (cpu := sum(converter[0].cpu_times()[:2])):
            break
        time.sleep(1)
    try:
        rank.send_signal(signal.SIGKILL)
        rank.wait()
        _, alive = psutil.wait_procs(converter, timeout=10)
        assert not alive
    finally:
        for p in converter:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


@pytest.mark.parametrize("name", ["run [2]", "run*"])
def test_a_checkpoint_dir_deepspeeds_glob_cannot_read_is_refused(tmp_path, name):
    """DeepSpeed finds a checkpoint's model files by glob: under `runs/exp [2]/checkpoints` a run
    saved its checkpoints, then every resume failed them all with a bare AssertionError."""
    with pytest.raises(ValueError, match=r"holds '\*', '\?' or '\['"):
        CheckpointManager(str(tmp_path / name / "checkpoints"), SOLO)
    with pytest.raises(ValueError, match=r"holds '\*', '\?' or '\['"):
        CheckpointManager("s3://b/ck", SOLO, staging_dir=str(tmp_path / name))
