"""Fine-tuning from an export (`init_from`): the run starts from the export's weights and takes its
architecture, and a config that contradicts it, or a path that is no export, fails at start."""

import os
import shutil

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from bdt.config import load
from bdt.generation.bitdance_release import import_release
from bdt.training.ar.init_from import resolve_init_from
from bdt.training.ar.config import TrainConfig, validate

from mllm_tiny import write_release
from trainutil import spawn_train, write_shards

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "train", "tiny.yaml")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The mllm_tiny fixture's release (16-bit tokens, P = 4, head 128 wide) as a bdt export."""
    root = tmp_path_factory.mktemp("init_from")
    release = write_release(root / "release")
    import_release(str(release), str(root / "export"))
    return root


def _config(*overrides: str) -> TrainConfig:
    cfg = load(TrainConfig, [TINY], ["data.root=unused", *overrides])
    return OmegaConf.to_object(cfg)


def test_init_from_supplies_backbone_tokenizer_and_architecture(imported):
    export = str(imported / "export")
    cfg = _config(f"init_from={export}")
    assert cfg.model.head.width == 32  # tiny.yaml's head, before
    resolve_init_from(cfg)
    assert cfg.model.backbone.path == os.path.join(export, "llm")
    assert cfg.data.tokenizer == os.path.join(export, "image_tokenizer")
    assert (cfg.model.head.width, cfg.model.head.bits, cfg.model.parallel_num) == (128, 16, 4)
    # A tokenizer given explicitly is kept.
    cfg = _config(f"init_from={export}", "data.tokenizer=/elsewhere/tokenizer")
    resolve_init_from(cfg)
    assert cfg.data.tokenizer == "/elsewhere/tokenizer"


@pytest.mark.parametrize("where, overrides, error, says", [
    ("export", ["model.backbone.path=/models/other"], ValueError,
     "leave model.backbone.path empty"),
    ("release", [], FileNotFoundError, "import-bitdance"),
    ("nowhere", [], FileNotFoundError, "not a bdt model export"),
])
def test_init_from_refuses_what_is_not_an_export_or_contradicts_it(imported, where, overrides,
                                                                   error, says):
    cfg = _config(f"init_from={imported / where}", *overrides)
    with pytest.raises(error, match=says):
        resolve_init_from(cfg)


def test_init_from_refuses_the_runs_own_export(imported, tmp_path):
    """A run replaces its export/ when it ends: started from it, it replaced its own source."""
    run_dir = tmp_path / "run"
    shutil.copytree(imported / "export", run_dir / "export")
    cfg = _config(f"init_from={run_dir}/export/", f"run_dir={run_dir}")
    with pytest.raises(ValueError, match=r"init_from=.* is this run's own export"):
        resolve_init_from(cfg)


def test_init_from_an_export_without_image_tokenizer_asks_for_data_tokenizer(imported, tmp_path):
    """A run without data.tokenizer exports none: the error names the key to set, not a path
    the user never gave."""
    export = tmp_path / "export"
    shutil.copytree(imported / "export", export, ignore=shutil.ignore_patterns("image_tokenizer"))
    with pytest.raises(FileNotFoundError, match=r"has no image_tokenizer/ .*set data.tokenizer"):
        resolve_init_from(_config(f"init_from={export}"))
    cfg = _config(f"init_from={export}", "data.tokenizer=/elsewhere/tokenizer")
    resolve_init_from(cfg)
    assert cfg.data.tokenizer == "/elsewhere/tokenizer"


def test_a_stage_beyond_the_exports_p_is_refused_without_a_futile_hint(imported):
    """The export fixes P: the error must not send the user to model.parallel_num, which
    init_from replaces."""
    cfg = _config(f"init_from={imported / 'export'}", "model.parallel_num=16",
                  "stages=[{name: a, shards: x, steps: 2, parallel_num: 16}]")
    resolve_init_from(cfg)
    with pytest.raises(ValueError, match=r"parallel_num = 16 exceeds model.parallel_num = 4: .*"
                                         r"init_from=.* is a P = 4 model: lower the stage's P$"):
        validate(cfg)


def test_the_readmes_fine_tuning_configs_take_an_export(imported):
    """configs/train/ar_progressive.yaml + configs/cluster/zero_14b.yaml with init_from, as the
    README's command gives them: the export's architecture replaces the files' 14B head."""
    configs = os.path.join(os.path.dirname(TINY), "..")
    export = str(imported / "export")
    cfg = OmegaConf.to_object(load(TrainConfig, [
        os.path.join(configs, "train", "ar_progressive.yaml"),
        os.path.join(configs, "cluster", "zero_14b.yaml")],
        [f"init_from={export}", f"data.tokenizer={export}/image_tokenizer", "data.root=tokens",
         "run_dir=runs/ft"]))
    assert cfg.model.head.width == 5120
    resolve_init_from(cfg)
    validate(cfg)
    assert (cfg.model.head.width, cfg.model.parallel_num) == (128, 4)


def test_a_run_needs_a_backbone_or_an_export():
    with pytest.raises(ValueError, match="model.backbone.path: name the LLM .* or start from a "
                                         "model export with init_from"):
        validate(_config())


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_a_run_starts_from_the_exported_weights(imported, tmp_path, zero, capfd):
    """At lr 0 the run changes nothing, so its export must equal the one it started from: the
    LLM, and the connector and head (a fresh head would not: its adaLN starts at zero). Under
    ZeRO-3 they are loaded before the model is partitioned. A later start of the run with another
    init_from resumes its checkpoint, and says that init_from is not loaded."""
    export = imported / "export"
    shards = tmp_path / "shards"
    write_shards(str(shards), [(2, 2), (4, 2)], num_shards=2, per_shard=8, bits=16, factor=4,
                 captions=["w1 w2", "w3", "w4 w5 w6"])
    run_dir = tmp_path / "run"
    argv = ["--config", TINY, f"run_dir={run_dir}", f"init_from={export}",
            f"data.root={shards}", "deepspeed.grad_accum=1", "checkpoint.every=0",
            f"deepspeed.zero_stage={zero}",
            "stages=[{name: ft, shards: '" + str(shards) + "', steps: 2, token_budget: 160, "
            "lr: 0.0, warmup_steps: 0, schedule: constant}]"]
    assert spawn_train(argv) == 0
    for name in ("bitdance_extra.safetensors", "llm/model.safetensors"):
        before, after = load_file(export / name), load_file(run_dir / "export" / name)
        assert before.keys() == after.keys()
        assert all(before[k].equal(after[k]) for k in before), name
    resolved = OmegaConf.load(run_dir / "config.yaml")
    assert resolved.model.head.width == 128 and resolved.init_from == str(export)
    if zero == 2:
        other = tmp_path / "other-export"
        shutil.copytree(export, other)
        capfd.readouterr()
        more = [a.replace("steps: 2", "steps: 3") for a in argv] + [f"init_from={other}"]
        assert spawn_train(more) == 0
        err = capfd.readouterr().err
        assert f"init_from={other} (the last start had '{export}') is not loaded" in err
