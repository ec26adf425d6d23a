"""bench/heldout_loss.py: both sets scored with the same draws per row, so the gap it reports is
the data's alone (the same shards give exactly 0), and the model's mode is left as it was."""

import json
import math
import sys

import pytest

from bdt.generation.bitdance_release import import_release
from bdt.generation.load import load_trained
from mllm_tiny import write_release
from testkit import REPO
from trainutil import write_shards

sys.path.insert(0, str(REPO / "bench"))

import heldout_loss  # noqa: E402  (bench/ is not a package)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout")
    import_release(str(write_release(root / "release")), str(root / "export"))
    return root / "export"


def shards(model, folder, seed: int) -> list[str]:
    return write_shards(str(folder), [(4, 4)], 1, 24, bits=model.cfg.head.bits, seed=seed)


def test_same_rows_same_draws_other_images_other_loss(export, tmp_path):
    model = load_trained(str(export)).model
    seen, unseen = shards(model, tmp_path / "a", 0), shards(model, tmp_path / "b", 1)
    model.train()
    first = heldout_loss.loss_on(model, seen, rows=2, budget=256)
    assert model.training  # scored in eval mode, handed back as it came
    assert first == heldout_loss.loss_on(model, seen, rows=2, budget=256)
    other = heldout_loss.loss_on(model, unseen, rows=2, budget=256)
    assert other["vision"] != first["vision"]
    assert first["rows"] == 2 and first["images"] > 2
    assert all(math.isfinite(first[k]) for k in ("vision", "vision_sem", "text_ce", "bit_accuracy"))


def test_main_reports_no_gap_for_the_same_shards(export, tmp_path, monkeypatch):
    import common

    model = load_trained(str(export)).model
    shards(model, tmp_path / "a", 0)
    monkeypatch.setattr(common, "RESULTS", str(tmp_path / "results"))
    glob = str(tmp_path / "a" / "*.tar")
    monkeypatch.setattr(sys, "argv", ["heldout_loss.py", "--model", str(export), "--train", glob,
                                      "--heldout", glob, "--rows", "2", "--budget", "256",
                                      "--threads", "1"])
    assert heldout_loss.main() == 0
    d = json.loads((tmp_path / "results" / "heldout_loss.json").read_text())
    assert d["bench"] == "heldout_loss" and d["results"]["heldout_gap"] == 0.0
    assert d["results"]["sets"]["train"]["vision"] == d["results"]["sets"]["heldout"]["vision"] > 0
