"""A tokenizer resume is refused by its checkpoint's records (marker, rank 0's state file) before
any tensor is read (bdt/training/tokenizer/resume_checks.py): the data stream's worker split and
the shard list its positions index, as the marker's seed, shard list and image decoding are.
The checkpoints here hold no tensor files at all."""

import os

import pytest
import torch

from bdt.config import load
from bdt.data.raw import make_loader
from bdt.training.checkpoint import CheckpointManager, tag_for
from bdt.training.distributed import DistInfo
from bdt.training.tokenizer.config import TokenizerTrainConfig
from bdt.training.tokenizer.loop import training_checkpoints
from bdt.training.tokenizer.resume_checks import resume_checks

SOLO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _config(tmp_path, *overrides):
    return load(TokenizerTrainConfig, [], [f"run_dir={tmp_path / 'run'}", "data.num_workers=0",
                                           *overrides])


def _save(mgr, cfg, step):
    """A checkpoint of `cfg`'s fresh stream, then every file but its marker and rank 0's state
    removed: a resume that read a tensor or verified the files would fail on that instead."""
    stream = make_loader(cfg.data, 2, 0, 1)[1].to_dict()
    mgr.save(step, engines={}, rank_meta={"step": step, "stream": stream})
    ckpt = os.path.join(mgr.root, tag_for(step))
    for name in os.listdir(ckpt):
        if name not in ("COMPLETE", "rank_00000.json"):
            os.remove(os.path.join(ckpt, name))


def test_the_data_stream_is_refused_by_the_records_before_any_tensor(tmp_path):
    (tmp_path / "shards").mkdir()
    for name in ("a", "b"):
        (tmp_path / "shards" / f"{name}.tar").write_bytes(b"")  # named, never read
    two = _config(tmp_path, f"data.shards={tmp_path / 'shards'}")
    _save(training_checkpoints(two, SOLO), two, 2)
    workers = _config(tmp_path, f"data.shards={tmp_path / 'shards'}", "data.num_workers=2")
    with pytest.raises(ValueError, match=r"^checkpoint \S+step_000000002: data.num_workers: the "
                                         r"checkpoint's stream state has 1 worker\(s\), this run "
                                         r"has 2; resume with the same number$"):
        training_checkpoints(workers, SOLO).resume(engines={}, before_load=resume_checks(workers))
    # The marker's records (CheckpointManager's settings) are refused before the hook's.
    seed = _config(tmp_path, f"data.shards={tmp_path / 'shards'}", "data.seed=1")
    with pytest.raises(ValueError, match=r"written with data.seed=0; this run has data.seed=1"):
        training_checkpoints(seed, SOLO).resume(engines={}, before_load=resume_checks(seed))
    # A marker from before data.shards was recorded: the positions' own shard list decides.
    one = _config(tmp_path, f"data.shards={tmp_path / 'shards' / 'a.tar'}")
    unnamed = {k: v for k, v in training_checkpoints(one, SOLO).settings.items()
               if k != "data.shards"}
    _save(CheckpointManager(training_checkpoints(one, SOLO).root, SOLO, settings=unnamed), one, 3)
    with pytest.raises(ValueError, match=r"^checkpoint \S+step_000000003: data.shards now names 2 "
                                         r"shard\(s\), not the list the checkpoint's stream read"):
        training_checkpoints(two, SOLO).resume(engines={}, before_load=resume_checks(two))
