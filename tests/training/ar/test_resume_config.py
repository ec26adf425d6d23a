"""A run resumed under an edited config: what the checkpoint cannot follow is refused at start,
before any step or write, in one line naming the key and both values."""

import json
import os
import shutil

import pytest
from omegaconf import OmegaConf

from testkit import TINY_CONFIG
from trainutil import CAPTIONS, spawn_train, tiny_llm, train_overrides, write_shards

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from bdt.model.backbone import make_tiny_llm

    root = tmp_path_factory.mktemp("resume_config")
    # An LLM of tiny_llm's shapes whose tokenizer learnt other text: other ids, same vocab size.
    other = make_tiny_llm(str(root / "other_llm"), [c[::-1] + " zq xv" for c in CAPTIONS] * 20,
                          hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64,
                          vocab_size=384, max_position_embeddings=1024)
    shards = write_shards(str(root / "s0"), [(4, 4), (4, 8)], num_shards=2, per_shard=8, factor=2)
    return {"llm": tiny_llm(str(root / "llm")), "other_llm": other,
            "shards": os.path.dirname(shards[0])}


def argv(data, run_dir, *extra, steps=2, llm=None):
    return ["--config", TINY_CONFIG, *train_overrides(str(run_dir), llm or data["llm"],
                                                      data["shards"], steps=[steps], every=2,
                                                      extra=extra)]


def assert_refused_before_any_step(run_dir, capfd, line):
    err = capfd.readouterr().err
    assert f"error: {line}" in err, err
    records = [json.loads(r) for r in open(run_dir / "metrics.jsonl")]
    assert max(r["step"] for r in records) == 2
    assert not any("resumed_from_step" in r for r in records)


def test_another_backbone_or_seed_is_refused_by_name(data, tmp_path, capfd):
    """From one checkpoint mid-stage (one rank: the checks are every rank's alike):
    - another backbone of the same shapes: the checkpoint's LLM weights replace its own, so its
      tokenizer's ids would index embeddings trained for other tokens: once resumed without a
      word (and its record replaced the run's backbone/, which sampling reads);
    - another seed: the stream cannot continue its shuffle under it; refused naming both seeds
      (once "other shards than ... or with another seed").
    Neither refusal rewrites the run's config.yaml."""
    assert spawn_train(argv(data, tmp_path, "fault.sigterm_at_step=2", steps=4), world=1) == 0
    capfd.readouterr()
    assert spawn_train(argv(data, tmp_path, steps=4, llm=data["other_llm"]), world=1) == 2
    assert_refused_before_any_step(
        tmp_path, capfd, f"checkpoints in {tmp_path}/checkpoints are from a different model: "
        f"model.backbone.path's text tokenizer is 647 tokens, sha256 ")
    assert spawn_train(argv(data, tmp_path, "seed=7", steps=4), world=1) == 2
    assert_refused_before_any_step(
        tmp_path, capfd, "seed = 7, but the run's data streams are shuffled with seed = 0 "
        f"(checkpoint {tmp_path}/checkpoints/step_000000002): resume with seed=0, or start a "
        "new run directory")
    recorded = OmegaConf.load(tmp_path / "config.yaml")
    assert recorded.model.backbone.path == data["llm"] and recorded.seed == 0


def test_another_seed_at_a_stage_switch_is_refused(data, tmp_path, capfd):
    """A checkpoint at a stage's end holds no stream to continue: another seed was taken there
    without a word, and the next stage's stream was shuffled from it (the same edit mid-stage is
    refused)."""
    def stages(n, *extra):
        return ["--config", TINY_CONFIG, *train_overrides(str(tmp_path), data["llm"],
                                                          [data["shards"]] * n, steps=[2] * n,
                                                          extra=extra)]
    assert spawn_train(stages(1), world=1) == 0  # saved at its end: step 2, stage 0 done
    capfd.readouterr()
    assert spawn_train(stages(2, "seed=7"), world=1) == 2
    assert_refused_before_any_step(
        tmp_path, capfd, "seed = 7, but the run's data streams are shuffled with seed = 0 "
        f"(checkpoint {tmp_path}/checkpoints/step_000000002)")


def test_another_image_tokenizer_is_refused_by_name(data, tmp_path, capfd):
    """Over shards without a manifest only data.tokenizer names the tokenizer: another one (here
    of the same config and bits) was taken without a word, the weights went on learning its bits
    and the export shipped it. Refused naming both, as is a resume that drops it. Decided from
    the checkpoint's records before its tensors are read (they were loaded first: minutes at
    1B parameters): with the tensor files gone, the refusals are the same, and so is another
    seed's."""
    from testkit import save_tiny_image_tokenizer

    tok_a, tok_b = str(tmp_path / "tok_a"), str(tmp_path / "tok_b")
    save_tiny_image_tokenizer(tok_a, seed=0)
    save_tiny_image_tokenizer(tok_b, seed=1)
    run = tmp_path / "run"
    assert spawn_train(argv(data, run, f"data.tokenizer={tok_a}", "fault.sigterm_at_step=2",
                            steps=4), world=1) == 0
    capfd.readouterr()
    saved = run / "checkpoints" / "step_000000002"
    shutil.rmtree(saved / "model")  # the engine's weights and optimizer state
    os.remove(saved / "rank_00000.safetensors")
    assert spawn_train(argv(data, run, f"data.tokenizer={tok_a}", "seed=7", steps=4), world=1) == 2
    assert_refused_before_any_step(run, capfd, "seed = 7, but the run's data streams are "
                                   f"shuffled with seed = 0 (checkpoint {saved}): ")
    assert spawn_train(argv(data, run, f"data.tokenizer={tok_b}", steps=4), world=1) == 2
    assert_refused_before_any_step(
        run, capfd, f"the image tokenizer is data.tokenizer = {tok_b} (model.safetensors sha256 ")
    assert spawn_train(argv(data, run, steps=4), world=1) == 2
    assert_refused_before_any_step(
        run, capfd, f"data.tokenizer is empty, but checkpoint {run}/checkpoints/step_000000002 "
        f"trained for the image tokenizer {tok_a}")
    assert OmegaConf.load(run / "config.yaml").data.tokenizer == tok_a
