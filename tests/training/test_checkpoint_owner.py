"""One checkpoint root, one run (bdt/training/checkpoint_owner.py): a second run dir on the same
checkpoint.dir is refused before anything is read or written, `checkpoint.adopt` takes a root over,
a root of an earlier bdt (no owner record) and a moved run dir resume, a copied run dir is
refused, readers are never refused; locally, on S3, on two ranks and through both trainers."""

import json
import os
import shutil
import subprocess
import sys

import fsspec
import pytest
import torch

from bdt import storage
from bdt.training.checkpoint import CheckpointManager, tag_for
from bdt.training.checkpoint_owner import OWNER_NAME, CheckpointRootTaken, run_id
from bdt.training.distributed import DistInfo, free_port
from bdt.training.run_dir import RUN_ID_NAME
from testkit import REPO, TINY_CONFIG
from trainutil import rank_entry, spawn_ranks

SOLO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _save(mgr, step):
    mgr.save(step, engines={}, rank_meta={"step": step}, shared={"w": torch.full((2,), float(step))})


def _bound(root, run_dir, adopt=""):
    mgr = CheckpointManager(str(root), SOLO, keep_last=2)
    mgr.bind(str(run_dir), adopt)
    return mgr


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_second_run_dir_on_the_same_root_is_refused_naming_both(tmp_path):
    root = tmp_path / "ck"
    _save(_bound(root, tmp_path / "a"), 1)
    first, before = run_id(str(tmp_path / "a")), _listing(root)
    with pytest.raises(CheckpointRootTaken) as refused:
        _bound(root, tmp_path / "b")
    second = run_id(str(tmp_path / "b"))
    message = str(refused.value)
    assert first != second
    for part in (str(root), first, second, str(tmp_path / "a"), str(tmp_path / "b"),
                 "checkpoint.dir", f"checkpoint.adopt={first}"):
        assert part in message, part
    assert _listing(root) == before  # nothing read into place, written or pruned there
    # A wrong id in checkpoint.adopt adopts nothing, and says so.
    with pytest.raises(CheckpointRootTaken, match="checkpoint.adopt is 'feedfeedfeedfeed', not"):
        _bound(root, tmp_path / "b", adopt="feedfeedfeedfeed")
    # Its owner restarts as before.
    assert _bound(root, tmp_path / "a").resume(engines={}).tag == tag_for(1)


def test_adopt_takes_the_root_over_and_stops_the_run_it_took_it_from(tmp_path):
    root = tmp_path / "ck"
    running = _bound(root, tmp_path / "a")
    _save(running, 1)
    old = run_id(str(tmp_path / "a"))
    fork = _bound(root, tmp_path / "b", adopt=old)
    assert fork.resume(engines={}).tag == tag_for(1)
    record = json.loads((root / OWNER_NAME).read_text())
    assert record["run_id"] == run_id(str(tmp_path / "b"))
    assert [r["run_id"] for r in record["adopted_from"]] == [old]
    _save(fork, 2)
    # The run it took the root from: its next save stops before writing, its next start too.
    with pytest.raises(CheckpointRootTaken, match=f"taken over by run {record['run_id']}"):
        _save(running, 3)
    assert not (root / tag_for(3)).exists()
    with pytest.raises(CheckpointRootTaken, match="belongs to another run"):
        _bound(root, tmp_path / "a")
    _bound(root, tmp_path / "b", adopt=old)  # the key left in the adopter's config: harmless


def test_a_root_without_owner_record_is_resumed_and_claimed(tmp_path):
    """Checkpoints written before owner records existed: the first run that opens them keeps
    resuming from them and becomes their owner; the next run dir is refused."""
    root = tmp_path / "ck"
    _save(CheckpointManager(str(root), SOLO), 4)  # no bind: as an earlier bdt left it
    assert not (root / OWNER_NAME).exists()
    assert _bound(root, tmp_path / "a").resume(engines={}).tag == tag_for(4)
    assert json.loads((root / OWNER_NAME).read_text())["run_id"] == run_id(str(tmp_path / "a"))
    with pytest.raises(CheckpointRootTaken):
        _bound(root, tmp_path / "b")


def test_a_moved_run_dir_resumes_a_copied_one_is_refused(tmp_path):
    root = tmp_path / "ck"
    _save(_bound(root, tmp_path / "a"), 1)
    os.rename(tmp_path / "a", tmp_path / "moved")
    assert _bound(root, tmp_path / "moved").resume(engines={}).tag == tag_for(1)
    assert json.loads((root / OWNER_NAME).read_text())["run_dir"] == str(tmp_path / "moved")
    shutil.copytree(tmp_path / "moved", tmp_path / "copy")
    with pytest.raises(CheckpointRootTaken, match=r"it is a copy.*Delete .*copy/RUN_ID"):
        _bound(root, tmp_path / "copy")
    os.remove(tmp_path / "copy" / RUN_ID_NAME)  # the way out: the copy becomes a new run
    _bound(tmp_path / "ck2", tmp_path / "copy")
    assert run_id(str(tmp_path / "copy")) != run_id(str(tmp_path / "moved"))


def test_a_copied_run_dir_with_its_own_checkpoints_resumes_beside_the_original(tmp_path):
    """With the default root, <run_dir>/checkpoints, a copy takes its checkpoints along: copy and
    original each resume from their own (a fork or a backup), neither is refused."""
    _save(_bound(tmp_path / "a" / "checkpoints", tmp_path / "a"), 1)
    shutil.copytree(tmp_path / "a", tmp_path / "fork")
    fork = _bound(tmp_path / "fork" / "checkpoints", tmp_path / "fork")
    assert fork.resume(engines={}).tag == tag_for(1)
    _save(fork, 2)
    assert _bound(tmp_path / "a" / "checkpoints", tmp_path / "a").resume(engines={}).tag == tag_for(1)


def test_readers_of_another_runs_root_are_not_refused(tmp_path):
    root = tmp_path / "ck"
    _save(_bound(root, tmp_path / "a"), 1)
    reader = CheckpointManager(str(root), SOLO)  # sampling, export-only, the resume wrapper
    assert reader.resume(engines={}).tag == tag_for(1)
    assert reader.list_tags() == [(1, tag_for(1), True)]


def test_damaged_identity_files_are_named(tmp_path):
    run = tmp_path / "a"
    run.mkdir()
    (run / RUN_ID_NAME).write_text("")
    with pytest.raises(ValueError, match=f"{run / RUN_ID_NAME} holds no run id"):
        _bound(tmp_path / "ck", run)
    (run / RUN_ID_NAME).unlink()
    (run / RUN_ID_NAME).mkdir()  # says why it cannot be read
    with pytest.raises(ValueError, match=f"{run / RUN_ID_NAME} cannot be read .Is a directory"):
        _bound(tmp_path / "ck", run)
    (run / RUN_ID_NAME).rmdir()
    _bound(tmp_path / "ck", run)
    # not JSON; a run_dir that is no path (a list made a TypeError, a number was taken for a
    # file descriptor); garbage nested past the parser (a RecursionError)
    for damaged in ("{", json.dumps({"run_id": run_id(str(run)), "run_dir": [str(run)]}),
                    json.dumps({"run_id": run_id(str(run)), "run_dir": 3}), "[" * 100_000):
        (tmp_path / "ck" / OWNER_NAME).write_text(damaged)
        with pytest.raises(ValueError, match=f"owner record {tmp_path / 'ck' / OWNER_NAME} is "
                                             f"damaged"):
            _bound(tmp_path / "ck", run)


def test_exclusive_create_keeps_the_first_content(tmp_path):
    path = str(tmp_path / "sub" / "f")
    assert storage.create_exclusive(path, b"first")
    assert not storage.create_exclusive(path, b"second")
    assert open(path, "rb").read() == b"first" and os.listdir(tmp_path / "sub") == ["f"]


@pytest.mark.slow
def test_s3_root_is_bound_to_one_run(s3_bucket, tmp_path):
    root = storage.join(s3_bucket, "runs", "a", "checkpoints")
    assert storage.create_exclusive(storage.join(s3_bucket, "probe"), b"first")
    assert not storage.create_exclusive(storage.join(s3_bucket, "probe"), b"second")  # conditional put
    assert storage.read_bytes(storage.join(s3_bucket, "probe")) == b"first"
    mgr = CheckpointManager(root, SOLO, staging_dir=str(tmp_path / "stage"))
    mgr.bind(str(tmp_path / "a"))
    _save(mgr, 1)
    other = CheckpointManager(root, SOLO, staging_dir=str(tmp_path / "stage_b"))
    with pytest.raises(CheckpointRootTaken, match=f"{root} belongs to another run"):
        other.bind(str(tmp_path / "b"))
    other.bind(str(tmp_path / "b"), adopt=run_id(str(tmp_path / "a")))
    assert other.resume(engines={}).tag == tag_for(1)
    owner = json.loads(storage.read_bytes(storage.join(root, OWNER_NAME)))
    assert owner["run_id"] == run_id(str(tmp_path / "b"))
    # A third run adopts it from another process while the second one's s3fs caches a listing
    # of the root (the record's old size): the second one's next save still sees the change.
    other.list_tags()
    elsewhere = fsspec.filesystem("s3", skip_instance_cache=True)
    third = {"run_id": "0123456789abcdef", "run_dir": "/elsewhere", "adopted_from": [owner] * 3}
    elsewhere.pipe_file(storage.filesystem(storage.join(root, OWNER_NAME))[1],
                        json.dumps(third).encode())
    with pytest.raises(CheckpointRootTaken, match="taken over by run 0123456789abcdef"):
        _save(other, 2)


@rank_entry
def _bind_rank(rank, world, port, root, run_dir, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from bdt.training.distributed import cleanup, init_distributed

    dist = init_distributed(use_deepspeed=False)
    outcome = {}
    for name in ("own", "taken"):
        mgr = CheckpointManager(os.path.join(root, name), dist)
        try:
            mgr.bind(run_dir)
            outcome[name] = ["bound", mgr.bound, mgr.run_id]
        except CheckpointRootTaken as e:
            outcome[name] = ["refused", str(e)]
    with open(os.path.join(out, f"r{rank}.json"), "w") as f:
        json.dump(outcome, f)
    cleanup()


@pytest.mark.slow
def test_two_ranks_share_rank0s_verdict(tmp_path):
    """Rank 0 alone reads and writes the records; the other rank gets the same verdict."""
    root = tmp_path / "ck"
    _bound(root / "taken", tmp_path / "other")
    spawn_ranks(_bind_rank, (2, free_port(), str(root), str(tmp_path / "run"), str(tmp_path)), 2)
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2))
    me = run_id(str(tmp_path / "run"))
    assert r0["own"] == ["bound", True, me] and r1["own"] == ["bound", True, None]
    assert r0["taken"][0] == "refused" and r1["taken"] == r0["taken"] and me in r0["taken"][1]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ar", "tokenizer"])
def test_trainers_refuse_another_runs_root_before_building(trainer, tmp_path):
    """Both trainers bind before they build a model (the AR one's backbone does not even exist),
    read or write the root; the error is recorded as one no restart fixes."""
    root = tmp_path / "ck"
    _save(_bound(root, tmp_path / "first"), 1)
    before = _listing(root)
    run = tmp_path / "second"
    common = [f"run_dir={run}", f"checkpoint.dir={root}"]
    if trainer == "ar":
        from trainutil import train_overrides, write_shards

        write_shards(str(tmp_path / "s"), [(4, 4)], num_shards=1, per_shard=2)
        cmd = [os.path.join(REPO, "bdt", "train.py"), "--config", TINY_CONFIG,
               *train_overrides(str(run), str(tmp_path / "no_llm"), str(tmp_path / "s")),
               f"checkpoint.dir={root}"]
    else:  # shards that exist, never read: the refusal comes first
        for name in ("s-000.tar", "s-001.tar"):
            (tmp_path / name).write_bytes(b"")
        cmd = [os.path.join(REPO, "tokenizers", "train.py"), *common,
               f"data.shards={tmp_path}/s-{{000..001}}.tar"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True,
                          timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "belongs to another run" in last, proc.stderr[-2000:]
    assert run_id(str(tmp_path / "first")) in last and str(run) in last
    assert _listing(root) == before
    if trainer == "ar":
        record = json.loads((run / "launch_error.json").read_text())
        assert "ValueError" in record["errors"][0]["types"]
