"""The image tokenizer a checkpoint was trained for (run_tokenizer.py): a resume for another one
is refused naming both, however consistently the shards and `data.tokenizer` were swapped."""

import json
import shutil

import pytest
from omegaconf import OmegaConf

from bdt.config import load
from bdt.tokenizer.io import tokenizer_identity
from bdt.training.ar.config import TrainConfig
from bdt.training.ar.run_tokenizer import META_KEY, check_resumed
from bdt.training.ar.start_checks import check_data
from testkit import TINY_CONFIG, save_tiny_image_tokenizer
from trainutil import train_overrides, write_shards

CKPT = "/runs/r/checkpoints/step_000000002"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Tokenizers A and B (other weights, same config) and an extraction output of each."""
    root = tmp_path_factory.mktemp("run_tokenizer")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        tok = str(root / f"tok_{name}")
        save_tiny_image_tokenizer(tok, seed=seed)
        shards = root / f"shards_{name}"
        write_shards(str(shards / "s"), [(4, 4)], num_shards=1, per_shard=2)
        index = {"schema": 1, "tokenizer": {"path": tok, "sha256": tokenizer_identity(tok)["sha256"]},
                 "stages": {"s": {"shards": [{"shard": "s/000000.tar"}]}}}
        (shards / "index.json").write_text(json.dumps(index))
        out[name], out[f"shards_{name}"] = tok, str(shards)
    return out


def start(tmp_path, shards, tokenizer=""):
    """What check_data finds at a start: the run's image tokenizer."""
    cfg = OmegaConf.to_object(load(TrainConfig, [TINY_CONFIG], train_overrides(
        str(tmp_path / "run"), "unused", shards, extra=[f"data.tokenizer='{tokenizer}'"])))
    return check_data(cfg).tokenizer


def meta(tokenizer):
    return {"step": 2, META_KEY: tokenizer.record() if tokenizer else None}


def test_a_consistent_swap_of_shards_and_tokenizer_is_refused_naming_both(made, tmp_path):
    """Shards and data.tokenizer swapped together agree with each other, so the start checks
    passed them and the run went on with weights trained on A's bits."""
    trained = meta(start(tmp_path, made["shards_a"], made["a"]))
    swapped = start(tmp_path, made["shards_b"], made["b"])
    sha_a, sha_b = (tokenizer_identity(made[k])["sha256"]["model.safetensors"][:12] for k in "ab")
    with pytest.raises(ValueError) as e:
        check_resumed(swapped, trained, CKPT)
    assert str(e.value) == (
        f"the image tokenizer is data.tokenizer = {made['b']} (model.safetensors sha256 "
        f"{sha_b}), but checkpoint {CKPT} trained for data.tokenizer = {made['a']} "
        f"(model.safetensors sha256 {sha_a}): resume with the original tokenizer and its token "
        f"shards, or start a new run directory (init_from= keeps the weights)")
    # Over shards without a manifest, data.tokenizer alone names it: swapped alone, the same.
    plain = str(tmp_path / "plain")
    write_shards(plain, [(4, 4)], num_shards=1, per_shard=2)
    with pytest.raises(ValueError, match=r"^the image tokenizer is data.tokenizer = .*tok_b "):
        check_resumed(start(tmp_path, plain, made["b"]), trained, CKPT)
    # A run that named no data.tokenizer: its record is the manifest's, and so is the message.
    from_manifest = meta(start(tmp_path, made["shards_a"]))
    with pytest.raises(ValueError, match=r"^the image tokenizer is the manifest of .*shards_b "
                                         r"\(.*\), but checkpoint .* trained for the manifest of "
                                         r".*shards_a \("):
        check_resumed(start(tmp_path, made["shards_b"]), from_manifest, CKPT)


def test_dropping_data_tokenizer_is_refused_and_the_same_files_anywhere_pass(made, tmp_path):
    """The shards still name the tokenizer, but the export copies data.tokenizer only: a resume
    without it would ship a model with no image tokenizer to decode with."""
    trained = meta(start(tmp_path, made["shards_a"], made["a"]))
    with pytest.raises(ValueError) as e:
        check_resumed(start(tmp_path, made["shards_a"]), trained, CKPT)
    assert str(e.value) == (
        f"data.tokenizer is empty, but checkpoint {CKPT} trained for the image tokenizer "
        f"{made['a']}: without it the run's export ships no image tokenizer to decode with; "
        f"resume with data.tokenizer={made['a']}")
    moved = shutil.copytree(made["a"], tmp_path / "moved")
    check_resumed(start(tmp_path, made["shards_a"], str(moved)), trained, CKPT)
    # Named for the first time at a resume: the manifest's tokenizer, so the same one.
    check_resumed(start(tmp_path, made["shards_a"], made["a"]),
                  meta(start(tmp_path, made["shards_a"])), CKPT)


def test_checkpoints_without_a_record_resume_saying_which_tokenizer_they_take(made, tmp_path,
                                                                            caplog):
    """Written before the record, or by a run whose data named no tokenizer: nothing to compare
    with, so they resume, but no longer in silence: the warning names the tokenizer the run's
    checkpoints record from now on (one rank says it)."""
    now = start(tmp_path, made["shards_b"], made["b"])
    for record in ({"step": 2}, meta(None)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            check_resumed(now, record, CKPT)
        assert [r.getMessage() for r in caplog.records] == [
            f"checkpoint {CKPT} records no image tokenizer (written before the record, or its "
            f"run named none): resuming for data.tokenizer = {made['b']}, which the run's next "
            f"checkpoint records; a later resume for another is refused"]
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_resumed(now, {"step": 2}, CKPT, quiet=True)
        check_resumed(None, {"step": 2}, CKPT)  # none then, none now: nothing to say
    assert not caplog.records


def test_the_record_keeps_a_relative_tokenizer_path_absolute(made, tmp_path, monkeypatch):
    """Resumed from another working directory, a relative path named another folder."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(made["a"], tmp_path / "tok")
    assert meta(start(tmp_path, made["shards_a"], "tok"))[META_KEY]["path"] == \
        str(tmp_path / "tok")
