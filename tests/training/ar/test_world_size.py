"""Resuming on another number of ranks: a 2-rank run resumed on 1 rank, that one resumed on 2
ranks from S3; the loss continues, the LR schedule is the uninterrupted run's, and the sample
keys consumed over the three launches plus those the last checkpoint still owes are the epoch,
each exactly once (ZeRO-2: DeepSpeed universal checkpoint conversion, automatic; rows prefetched
by a worker process, 3 ahead)."""

import json
import os
import shutil

import pytest

from bdt.training.checkpoint_owner import OWNER_NAME
from testkit import TINY_CONFIG
from trainutil import (read_metrics, spawn_train, tiny_llm, train_overrides, unconsumed_keys,
                       write_shards)

pytestmark = pytest.mark.slow

STEPS, NUM_SHARDS, PER_SHARD = 8, 6, 40
GRIDS = [(4, 4), (4, 8), (8, 4)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    urls = write_shards(str(root / "s0"), GRIDS, num_shards=NUM_SHARDS, per_shard=PER_SHARD)
    return {"root": root, "llm": tiny_llm(str(root / "llm")), "urls": urls}


def argv(data, run_dir, *extra):
    return ["--config", TINY_CONFIG, *train_overrides(
        str(run_dir), data["llm"], os.path.dirname(data["urls"][0]), steps=STEPS, every=3,
        extra=("checkpoint.keep_last=0", "logging.sample_keys=true", "export=false",
               # rows built ahead by a worker process: the checkpoints must still owe exactly
               # the samples not consumed (those prefetched and never taken included)
               "data.prefetch=3", "data.prefetch_worker=process", *extra))]


def consumed(run_dir, steps):
    """Sample keys the run's ranks logged for `steps` (every micro-batch, all ranks)."""
    out = []
    for name in sorted(os.listdir(run_dir / "sample_keys")):
        for line in open(run_dir / "sample_keys" / name):
            rec = json.loads(line)
            if rec["step"] in steps:
                out += rec["keys"]
    return out


def copy_checkpoint(src_run, tag, dst):
    os.makedirs(dst, exist_ok=True)
    shutil.copytree(src_run / "checkpoints" / tag, os.path.join(dst, tag))
    shutil.copy(src_run / "checkpoints" / "model_shapes.json", dst)


def assert_continues(ref, got, steps):
    """LR exactly the uninterrupted run's; the loss over the resumed steps within that run's
    step-to-step noise of its loss there (other ranks see other samples: not bitwise)."""
    losses = [ref[s]["loss"] for s in sorted(ref)]
    noise = max(abs(a - b) for a, b in zip(losses, losses[1:]))
    for s in steps:
        assert got[s]["lr"] == ref[s]["lr"], s
        assert min(losses) - noise <= got[s]["loss"] <= max(losses) + noise, (s, got[s], noise)
    mean = sum(got[s]["loss"] - ref[s]["loss"] for s in steps) / len(steps)
    assert abs(mean) <= noise, (mean, noise)


def test_two_to_one_to_two_ranks(data, s3_bucket):
    import fsspec

    root = data["root"]
    assert spawn_train(argv(data, root / "ref")) == 0  # uninterrupted, 2 ranks
    ref = read_metrics(str(root / "ref"))
    assert ref[1]["loss"] > ref[STEPS]["loss"]

    # 2 -> 1: the 2-rank checkpoint of step 3; the 1-rank run stops (SIGTERM) after step 6
    copy_checkpoint(root / "ref", "step_000000003", root / "one" / "checkpoints")
    assert spawn_train(argv(data, root / "one", "fault.sigterm_at_step=6"), world=1) == 0
    one = read_metrics(str(root / "one"))
    assert_continues(ref, one, range(4, 7))
    assert (root / "one" / "checkpoints" / "step_000000003.w00001" / "model" / "zero").is_dir()
    resumed = [json.loads(line) for line in open(root / "one" / "metrics.jsonl")
               if "resumed_from_step" in line]
    assert [(r["resumed_from_step"], r["resumed_from_world_size"]) for r in resumed] == [(3, 2)]

    # 1 -> 2 with the checkpoints on S3: the conversion is made and read there
    ck = f"{s3_bucket}/run/ck"
    fs = fsspec.filesystem("s3")
    local = root / "one" / "checkpoints"
    for path in sorted(local.rglob("*")):
        rel = path.relative_to(local).as_posix()
        # without run one's owner record: a root as an earlier bdt left it, which run two takes
        if path.is_file() and (rel.startswith("step_000000006/") or "/" not in rel) \
                and rel != OWNER_NAME:
            fs.put_file(str(path), f"{ck}/{rel}")
    assert spawn_train(argv(data, root / "two", f"checkpoint.dir={ck}",
                            f"checkpoint.staging_dir={root / 'staging'}")) == 0
    two = read_metrics(str(root / "two"))
    assert_continues(ref, two, range(7, STEPS + 1))
    fs.invalidate_cache()
    assert fs.exists(f"{ck}/step_000000006.w00002/COMPLETE")
    assert fs.exists(f"{ck}/step_{STEPS:09d}/rank_00001.json")

    # every sample once: consumed in the three launches, or still owed by the last checkpoint
    eaten = (consumed(root / "ref", range(1, 4)) + consumed(root / "one", range(4, 7))
             + consumed(root / "two", range(7, STEPS + 1)))
    owed = []
    for rank in range(2):
        meta = json.loads(fs.cat(f"{ck}/step_{STEPS:09d}/rank_{rank:05d}.json"))["state"]["stream"]
        assert meta["pending"], "test sizing: a rank finished the old epoch"
        owed += unconsumed_keys(meta, data["urls"], rank, 2, seed=0)
    assert len(eaten) == len(set(eaten)) > 0
    assert sorted(eaten + owed) == sorted(f"s{n:06d}" for n in range(NUM_SHARDS * PER_SHARD))

