"""check_data at start: the sample it checks the stage's bit width against is the first one that
decodes (an empty or damaged first shard does not let another bit width through to fail after a
whole epoch), an extraction manifest's shards hold the family they are listed for, and a family is
named only for shards that have a manifest."""

import json
import os
import re

import pytest
import webdataset as wds
from omegaconf import OmegaConf

from bdt.config import load
from bdt.training.ar.config import TrainConfig
from bdt.training.ar.start_checks import check_data
from testkit import TINY_CONFIG
from trainutil import train_overrides, write_shards


def config(tmp_path, shards):
    return OmegaConf.to_object(load(TrainConfig, [TINY_CONFIG], train_overrides(
        str(tmp_path / "run"), "unused", shards)))


@pytest.mark.parametrize("first", ["empty", "garbage", "cut"])
def test_another_bit_width_behind_a_bad_first_shard_is_refused(tmp_path, first):
    shards = tmp_path / "s"
    write_shards(str(shards), [(4, 4)], num_shards=2, per_shard=2, bits=32)
    bad = str(shards / "0.tar")  # sorts first
    if first == "empty":
        wds.TarWriter(bad, encoder=False).close()
    elif first == "garbage":
        open(bad, "wb").write(os.urandom(3000))
    else:
        open(bad, "wb").write(open(shards / "000000.tar", "rb").read()[:700])
    with pytest.raises(ValueError, match=r"000000.tar holds 32-bit tokens, model.head.bits is 16"):
        check_data(config(tmp_path, str(shards)))


def test_a_manifest_listing_another_familys_shard_is_refused(tmp_path):
    write_shards(str(tmp_path / "a"), [(4, 4)], num_shards=1, per_shard=2, stage="a")
    write_shards(str(tmp_path / "b"), [(4, 4)], num_shards=1, per_shard=2, stage="b")
    (tmp_path / "index.json").write_text(json.dumps({"stages": {
        "a": {"shards": [{"shard": "b/000000.tar"}]}, "b": {"shards": [{"shard": "b/000000.tar"}]}}}))
    cfg = config(tmp_path, str(tmp_path))
    cfg.stages[0].family = "b"
    assert check_data(cfg).sources[0].urls[0].endswith("b/000000.tar")
    cfg.stages[0].family = "a"
    with pytest.raises(ValueError, match=r"b/000000.tar, listed for family 'a' .* family 'b'"):
        check_data(cfg)


@pytest.mark.parametrize("layout", ["folder", "glob", "tar"])
def test_a_family_named_for_shards_without_a_manifest_is_refused(tmp_path, layout):
    """Two stages over one hand-made folder holding two families' shards: without a manifest
    nothing says which shards are whose, so each stage trained on both (the family was ignored)."""
    for family, grid in (("a", (4, 4)), ("b", (4, 8))):
        (url,) = write_shards(str(tmp_path / family), [grid], num_shards=1, per_shard=2, stage=family)
        os.makedirs(tmp_path / "flat", exist_ok=True)
        os.replace(url, tmp_path / "flat" / f"{family}.tar")
    source = {"folder": tmp_path / "flat", "glob": tmp_path / "flat" / "*.tar",
              "tar": tmp_path / "flat" / "a.tar"}[layout]
    cfg = OmegaConf.to_object(load(TrainConfig, [TINY_CONFIG], train_overrides(
        str(tmp_path / "run"), "unused", [str(source), str(source)])))
    assert [len(s.urls) for s in check_data(cfg).sources] == [1 if layout == "tar" else 2] * 2
    cfg.stages[0].family, cfg.stages[1].family = "a", "b"
    with pytest.raises(ValueError, match=r"^stages\[0\] \(s0\): family 'a' picks a family of an "
                                         r"extraction output, but .*flat.* has no index.json"):
        check_data(cfg)


@pytest.mark.slow
def test_skipped_samples_reach_the_logs_and_the_summary(tmp_path):
    """One training run over good shards and shards of skipped samples (another bit width, a grid
    the stage cannot pack, a damaged sample, a caption longer than the budget): it trains, and
    every skip counter is in metrics.jsonl and summary.json."""
    import subprocess
    import sys

    from testkit import REPO
    from trainutil import tiny_llm

    data = tmp_path / "s"
    write_shards(str(data), [(4, 4), (4, 8)], num_shards=1, per_shard=8)
    for name, kw in {"b32": dict(bits=32), "odd": dict(grids=[(3, 4)]),
                     "long": dict(captions=["word " * 20000])}.items():
        (url,) = write_shards(str(tmp_path / name), kw.pop("grids", [(4, 4)]), 1, 2, **kw)
        os.replace(url, data / f"{name}.tar")
    with wds.TarWriter(str(data / "damaged.tar"), encoder=False) as sink:
        sink.write({"__key__": "x", "bits.npy": b"garbage", "txt": b"a", "json": b"{}"})
    run_dir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "bdt", "train.py"), "--config", TINY_CONFIG,
           *train_overrides(str(run_dir), tiny_llm(str(tmp_path / "llm")), str(data), steps=3,
                            zero=0, every=0, extra=["export=false", "data.buffer_size=4"])]
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())["stream"]
    logged = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    last = [r for r in logged if "data/wrong_bits" in r][-1]
    for key, least in {"wrong_bits": 2, "bad_grid": 2, "oversize": 2, "corrupt": 1}.items():
        assert summary[key] >= least and last[f"data/{key}"] == summary[key], key


@pytest.mark.parametrize("buckets", ["64x64", [[64]], [["64", "64"]], [[64.0, 64.0]], [[0, 0]],
                                     [[24, 64]], {"a": 1}])
def test_manifest_buckets_that_are_not_sizes_are_refused_at_start(tmp_path, buckets):
    """Tiny shards have a downsample factor of 16: 24 px is no whole number of tokens."""
    write_shards(str(tmp_path / "s"), [(4, 4)], num_shards=1, per_shard=2)
    (tmp_path / "index.json").write_text(json.dumps({"stages": {"s": {
        "buckets": buckets, "shards": [{"shard": "s/000000.tar"}]}}}))
    with pytest.raises(ValueError, match=r"^stages\[0\] \(s0\): .*index.json: family 's' lists "
                                         r"the buckets"):
        check_data(config(tmp_path, str(tmp_path)))


@pytest.mark.slow
def test_a_shard_whose_read_never_returns_stops_the_run_naming_it(tmp_path):
    """A shard whose open blocks forever, as a read on a hung mount does: a named pipe put in a
    listed shard's place once the shards are listed (the listing refuses a pipe), before the
    stream opens it. Before: the run waited for good (the other ranks would time out in a
    collective)."""
    import subprocess
    import sys
    import time

    from testkit import REPO
    from trainutil import tiny_llm

    data = tmp_path / "s"
    write_shards(str(data), [(4, 4), (4, 8)], num_shards=3, per_shard=4)
    hung = data / "000002.tar"  # sorts last: the checks at start read the first shard
    run_dir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "bdt", "train.py"), "--config", TINY_CONFIG,
           *train_overrides(str(run_dir), tiny_llm(str(tmp_path / "llm")), str(data), steps=50,
                            zero=0, every=0, extra=["export=false", "data.stall_s=3"])]
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        # The run lock is taken after the listing, seconds before the model is built.
        while not (run_dir / "RUN_LOCK").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.01)
        hung.unlink()
        os.mkfifo(hung)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, stderr[-3000:]  # as bdt's other errors
    assert re.search(rf"error: the prefetch worker built no row for 3 s; it is reading "
                     rf"{re.escape(str(data / '000002.tar'))} from byte 0", stderr), \
        stderr[-3000:]
