"""Values no run can use are refused by the jobs' config checks, naming the key, before any
process group, model or data read: the tokenizer trainer and the extraction (the AR trainer's:
tests/training/ar/test_train_inputs.py)."""

from __future__ import annotations

import json
import os

import pytest

from bdt.config import load
from testkit import REPO

TOKENIZER_YAML = str(REPO / "configs" / "tokenizer" / "shapes_d8.yaml")


def _tokenizer(tmp_path, *extra):
    from bdt.training.tokenizer.config import RENAMED_KEYS, TokenizerTrainConfig, validate

    validate(load(TokenizerTrainConfig, [TOKENIZER_YAML],
                  [f"run_dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'none.tar'}",
                   "data.size=32", *extra], renamed=RENAMED_KEYS))


@pytest.mark.parametrize("override, named", [
    ("ema_decay=1", r"^ema_decay must be in \[0, 1\) \(0 = off\), got 1.0"),
    ("ema_decay=.nan", r"^ema_decay must be in \[0, 1\)"),
    ("time_limit_min=-1", r"^time_limit_min must be >= 0 \(0 = no limit\), got -1.0"),
    ("seed=-1", r"^seed must be in \[0, 2\^53\), got -1"),
    ("data.size=0", r"^data.size must be >= 1, got 0"),
    ("data.resize=16", r"^data.resize must be 0 \(= data.size\) or >= data.size 32, got 16"),
    ("data.num_workers=-1", r"^data.num_workers must be >= 0"),
    ("data.seed=-1", r"^data.seed must be in \[0, 2\^63\), got -1"),
    ("data.stall_s=-1", r"^data.stall_s must be a finite number of seconds >= 0 \(0 = no limit\)"),
    ("data.stall_s=.nan", r"^data.stall_s must be a finite number of seconds >= 0"),
    # the DataLoader's timeout overflowed: an OverflowError at the first batch
    ("data.stall_s=1e7", r"^data.stall_s must be .* and at most 1e6, got 10000000.0"),
    ("optim.lr=-1", r"^optim.lr must be a finite number >= 0, got -1.0"),
    ("optim.lr=.inf", r"^optim.lr must be a finite number >= 0, got inf"),
    ("optim.warmup_steps=-1", r"^optim.warmup_steps must be >= 0, got -1"),
    ("optim.schedule=linear", r"^optim.schedule must be one of \['constant', 'cosine'\]"),
    ("optim.min_lr_ratio=2", r"^optim.min_lr_ratio must be in \[0, 1\], got 2.0"),
    ("optim.beta2=1", r"^optim.beta2 must be in \[0, 1\), got 1.0"),
    ("optim.eps=0", r"^optim.eps must be > 0, got 0.0"),
    ("deepspeed.micro_batch_size=0", r"^deepspeed: micro_batch_size and grad_accum must be >= 1"),
    ("deepspeed.precision=fp16", r"^deepspeed.precision: expected one of"),
    ("checkpoint.every=-1", r"^checkpoint.every must be >= 0 \(0 = only at the end\), got -1"),
    ("checkpoint.keep_last=-1", r"^checkpoint.keep_last must be >= 0 \(0 = keep all\)"),
    ("checkpoint.staging_dir=s3://b/x", r"^checkpoint.staging_dir must be a local directory"),
    ("run_dir=s3://b/run", r"^run_dir must be a local directory, got 's3://b/run'"),
    ("run_dir=runs/$USER", r"^run_dir 'runs/\$USER': \$USER is not expanded in a config"),
    ("logging.every=0", r"^logging.every must be >= 1, got 0"),
    ("logging.image_every=-1", r"^logging.image_every must be >= 0 \(0 = never\), got -1"),
    ("logging.num_images=0", r"^logging.num_images must be >= 1, got 0"),
    ("loss.pixel_weight=.nan", r"^loss.pixel_weight must be a finite number >= 0, got nan"),
    ("loss.disc_weight=-1", r"^loss.disc_weight must be a finite number >= 0, got -1.0"),
    ("loss.disc_start=-1", r"^loss.disc_start must be >= 0, got -1"),
    ("loss.disc_lr=.nan", r"^loss.disc_lr must be a finite number >= 0, got nan"),
    ("model.entropy_temperature=.nan", r"^tokenizer config: entropy_temperature must be > 0"),
    ("model.commitment_weight=-1", r"^tokenizer config: commitment_weight must be a finite "
                                   r"number >= 0, got -1.0"),
])
def test_tokenizer_training_values_no_run_can_use_are_named(tmp_path, override, named):
    """Each is refused by its own message, before the shard list is read (the shards given
    here do not exist: a config that passes every check fails on them instead)."""
    with pytest.raises(ValueError, match=r"^data.shards: 1 shard\(s\) do not exist"):
        _tokenizer(tmp_path, "loss.disc_width=0")  # unused while the discriminator is off
    with pytest.raises(ValueError, match=named):
        _tokenizer(tmp_path, override)


def test_tokenizer_discriminator_sizes_are_checked_when_it_is_on(tmp_path):
    with pytest.raises(ValueError, match=r"^loss.disc_layers must be >= 1, got 0"):
        _tokenizer(tmp_path, "loss.disc_weight=0.1", "loss.disc_layers=0")


def test_tokenizer_trainer_refuses_before_writing_anything_but_the_record(tmp_path, capsys):
    from bdt.training.tokenizer.loop import main

    with pytest.raises(SystemExit) as exit_:
        main(["--config", TOKENIZER_YAML, f"run_dir={tmp_path / 'run'}", "optim.lr=.nan",
              f"data.shards={tmp_path / 'none.tar'}"])
    assert exit_.value.code == 2
    assert "error: optim.lr must be a finite number >= 0, got nan" in capsys.readouterr().err
    # nothing but the record of the refusal, for bdt.cluster.resume (as the AR trainer's)
    assert os.listdir(tmp_path / "run") == ["launch_error.json"]
    assert "optim.lr" in json.loads((tmp_path / "run" / "launch_error.json").read_text())["message"]


def _extract(*extra):
    from bdt.extract.config import ExtractConfig, validate

    validate(load(ExtractConfig, [], ["inputs=in/*.tar", "output=out", "tokenizer=tok", *extra]))


@pytest.mark.parametrize("override, named", [
    ("stages=[{resolution: 32, name: '..'}]", r"stages\[0\]: name '..' must be unique, a plain "
                                              r"directory name"),
    ("stages=[{resolution: 32, name: a/b}]", r"stages\[0\]: name 'a/b' must be unique"),
    ("stages=[{resolution: 32}, {resolution: 32}]", r"stages\[1\]: name '32' must be unique"),
    ("image_extensions=[]", r"image_extensions: list at least one"),
    ("cpus_per_actor=.nan", r"cpus_per_actor: must be > 0, got nan"),
    ("gpus_per_actor=.nan", r"gpus_per_actor: must be >= 0, got nan"),
    ("progress_interval_s=0", r"progress_interval_s: must be > 0, got 0.0"),
    ("progress_interval_s=.nan", r"progress_interval_s: must be > 0, got nan"),
    # an empty output passed, and plan() wrote /plan.json and /config.yaml (joined to the root)
    ("output=''", r"^output: is empty: name the output directory"),
    ("inputs=' '", r"^inputs: is empty"),
    ("tokenizer=''", r"^tokenizer: is empty"),
])
def test_extraction_values_no_run_can_use_are_named(override, named):
    _extract()  # the base config passes
    with pytest.raises(ValueError, match=named):
        _extract(override)
