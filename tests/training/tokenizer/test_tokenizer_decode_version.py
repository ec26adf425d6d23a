"""The image decoding a tokenizer run's checkpoints were trained on (bdt/data/images.py
DECODE_VERSION) is checked at resume: a run resumed across a change would train on both."""

import json

import pytest
import torch

from bdt.config import load
from bdt.data.images import DECODE_VERSION
from bdt.training.checkpoint import MARKER, CheckpointManager, tag_for
from bdt.training.distributed import DistInfo
from bdt.training.tokenizer.config import TokenizerTrainConfig
from bdt.training.tokenizer.loop import training_checkpoints

SOLO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _save(mgr, step):
    mgr.save(step, engines={}, rank_meta={"step": step, "stream": None})


def test_a_checkpoint_of_another_image_decoding_is_refused(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"")  # named, never read
    cfg = load(TokenizerTrainConfig, [], [f"data.shards={tmp_path / 'shards'}",
                                          f"run_dir={tmp_path / 'run'}"])
    ours = training_checkpoints(cfg, SOLO)
    _save(ours, 2)
    marker = json.loads((tmp_path / "run" / "checkpoints" / tag_for(2) / MARKER).read_text())
    assert marker["settings"]["data.decode_version"] == DECODE_VERSION
    assert training_checkpoints(cfg, SOLO).resume(engines={}).tag == tag_for(2)
    # One the trainer wrote before it recorded the version (the same settings otherwise) decoded
    # with version 1: refused before anything is loaded, not passed over for an older one.
    before = {k: v for k, v in ours.settings.items() if k != "data.decode_version"}
    _save(CheckpointManager(ours.root, SOLO, settings=before), 3)
    with pytest.raises(ValueError, match=rf"^checkpoint \S+step_000000003 was written with "
                                         rf"data.decode_version 1, this bdt's is {DECODE_VERSION} "
                                         rf"\(bdt/data/images.py DECODE_VERSION: .*\), and a resume "
                                         rf"would mix the two: start a new run directory \(run_dir\)$"):
        training_checkpoints(cfg, SOLO).resume(engines={})
