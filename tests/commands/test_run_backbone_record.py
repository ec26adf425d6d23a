"""Sampling a run dir from its checkpoint rebuilds the LLM from `<run>/backbone/` (its config and
text tokenizer as the run recorded them): a damaged record fails naming it and what it lacks,
not deep inside transformers, and never falls back to another LLM silently."""

import os
import shutil

import pytest

from bdt.cli import main
from evalutil import BUCKET

pytestmark = pytest.mark.slow


def _truncate(path) -> None:
    path.write_text(path.read_text()[:20])


DAMAGE = {
    "config.json truncated": (lambda b: _truncate(b / "config.json"), "does not rebuild"),
    "tokenizer.json truncated": (lambda b: _truncate(b / "tokenizer.json"), "does not rebuild"),
    "tokenizer.json missing": (lambda b: (b / "tokenizer.json").unlink(), "no vocabulary file"),
    "tokenizer_config.json missing": (lambda b: (b / "tokenizer_config.json").unlink(),
                                      "no tokenizer_config.json"),
    "a file, not a folder": (lambda b: (shutil.rmtree(b), b.write_text("x")), "not a directory"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_backbone_record_is_named(trained_run, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("export"))
    change, why = DAMAGE[damage]
    change(run / "backbone")
    code = main(["sample", "--model", str(run), "--size", str(BUCKET[0]), "--steps", "1",
                 "--prompt", "a red circle", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"bdt sample: error: {run / 'backbone'}: the run's record of its "
                             f"LLM's config and text tokenizer is damaged ("), err
    assert why in err[0] and "remove it to build from model.backbone.path" in err[0], err
    assert not os.path.exists(tmp_path / "out")
