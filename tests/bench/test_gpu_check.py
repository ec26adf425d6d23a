"""scripts/gpu_check.sh's inputs: the GPU overlays load over the demo config, and the environment
stage names what is missing. The whole check runs as a CPU rehearsal in ~3 min, too long for the
suite: `scripts/gpu_check.sh --cpu-rehearsal /tmp/gpu_check` (README, "On a GPU")."""

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from bdt.config import load
from bdt.training.ar.config import TrainConfig, validate
from testkit import REPO

sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402  (bench/ is not a package)


@pytest.mark.parametrize("overlay, hidden, stages", [("gpu_1b_mfu.yaml", 2048, 1),
                                                     ("gpu_shapes_quality.yaml", 512, 2)])
def test_gpu_overlays_load_over_the_demo(overlay, hidden, stages):
    cfg = load(TrainConfig, [str(REPO / "configs/train/demo.yaml"),
                             str(REPO / "configs/cluster" / overlay)],
               ["run_dir=/tmp/r", "stages.0.shards=/tmp/t/64/*.tar"])
    validate(OmegaConf.to_object(cfg))
    assert cfg.model.backbone.from_scratch and len(cfg.stages) == stages
    assert cfg.model.backbone.config_overrides["hidden_size"] == hidden
    assert cfg.deepspeed.precision == "bf16" and cfg.logging.peak_tflops == 0.0
    assert all(s.token_budget == 16384 for s in cfg.stages)


def test_trainer_1b_run_is_the_benchmarked_configuration():
    """gpu_check.sh sets the trainer's 1.2B run (demo.yaml + gpu_1b_mfu.yaml) beside
    bench/gpu_throughput.py's engine and the first GPU run: the demo's EMA and head repeats,
    merged from demo.yaml, made its steps another model's."""
    from bdt.model.head import HeadConfig

    cfg = OmegaConf.to_object(load(TrainConfig, [str(REPO / "configs/train/demo.yaml"),
                                                 str(REPO / "configs/cluster/gpu_1b_mfu.yaml")],
                                   ["run_dir=/tmp/r"]))
    bench_head = HeadConfig(width=1024, depth=4, num_adaln_sets=2, head_dim=64, bits=32)
    assert cfg.model.head == bench_head and cfg.ema_decay == 0.0
    # its end is the metrics: a final save of ~17 GB ran past the stage's limit
    assert not cfg.checkpoint.at_end and not cfg.export


def test_env_stage_names_missing_packages(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"  # not there yet: run by hand, OUT is the stage's to make
    assert gpu_check.env(str(out), rehearsal=True) == 0
    assert json.loads((out / "env.json").read_text())["missing"].keys() <= set(
        gpu_check.OPTIONAL)
    monkeypatch.setattr(gpu_check, "NEEDED", gpu_check.NEEDED + ["no_such_package_bdt"])
    assert gpu_check.env(str(out), rehearsal=True) == 1
    assert "missing packages: no_such_package_bdt" in capsys.readouterr().out


@pytest.mark.slow
def test_env_stage_imports_nothing_but_torch(tmp_path):
    """The stage has 20 s: importing DeepSpeed, transformers and Ray cold on a fresh machine could
    outlast it and end the whole check. It reads the installed packages' metadata instead."""
    code = ("import sys; sys.path.insert(0, 'bench'); import gpu_check; "
            f"gpu_check.env({str(tmp_path)!r}, rehearsal=True); "
            "print(sorted(m for m in ('deepspeed', 'transformers', 'ray', 'webdataset') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert json.loads((tmp_path / "env.json").read_text())["found"]["deepspeed"][0].isdigit()


def test_env_stage_takes_no_plain_folder_for_a_package(tmp_path, monkeypatch, capsys):
    """The stage runs with the repo on PYTHONPATH: its tokenizers/ folder (no __init__.py), a
    namespace package to Python, counted as the `tokenizers` package where that was missing."""
    (tmp_path / "no_such_package_bdt").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(gpu_check, "NEEDED", gpu_check.NEEDED + ["no_such_package_bdt"])
    assert gpu_check.env(str(tmp_path), rehearsal=True) == 1
    assert "missing packages: no_such_package_bdt" in capsys.readouterr().out


def test_the_1b_trainer_run_leaves_a_flex_that_failed_in_the_throughput_stage(tmp_path, capsys):
    """flex hung on the first GPU run: the throughput stage ran into its limit under flex, then
    the trainer's flex run hung for its whole stage too, two minutes of the session for nothing.
    It now takes the fastest backend measured; flex when its result is unknown."""
    results = tmp_path / "gpu_throughput.json"
    assert gpu_check.train_backend(str(results)) == "flex"  # no file: the stage never wrote it
    backends = {"sdpa": {"mfu": 0.2, "tokens_per_s": 2e4},
                "varlen": {"mfu": 0.3, "tokens_per_s": 3e4},
                "sdpa+compile": {"mfu": 0.4, "tokens_per_s": 4e4},
                "flex": {"skipped": "out of time"}}
    results.write_text(json.dumps({"results": {"backends": backends}}))
    assert gpu_check.train_backend(str(results)) == "flex"
    backends["flex"] = {"failed": "did not finish: hung or killed"}
    results.write_text(json.dumps({"results": {"backends": backends}}))
    assert gpu_check.train_backend(str(results)) == "varlen"
    assert "flex did not finish" in capsys.readouterr().err
    results.write_text(json.dumps({"results": {"backends": {"flex": backends["flex"]}}}))
    assert gpu_check.train_backend(str(results)) == "sdpa"


def test_report_says_which_backend_the_1b_trainer_run_used(tmp_path):
    run = tmp_path / "run_1b"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  attn_backend: sdpa\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "mfu": 0.2}) + "\n"
                                               for s in (5, 10)))
    t = gpu_check.trainer_run(str(run))
    assert t["attn_backend"] == "sdpa" and t["logged_steps"] == [5, 10]
