"""The demo's training configs: the CPU one and the GPU overlay scripts/demo.sh layers on it when
torch sees a GPU load, validate, and keep the stage layout the token shards are extracted for."""

import pytest
from omegaconf import OmegaConf

from bdt.config import load
from bdt.extract.config import ExtractConfig, stage_name
from bdt.extract.config import validate as validate_extract
from bdt.training.ar.config import TrainConfig, validate
from testkit import REPO

DEMO = str(REPO / "configs/train/demo.yaml")


def _load(*overlays: str) -> TrainConfig:
    cfg = OmegaConf.to_object(load(TrainConfig, [DEMO, *overlays],
                                   ["run_dir=/tmp/r", "data.root=/tmp/tokens"]))
    validate(cfg)
    return cfg


def test_gpu_overlay_keeps_the_demo_stages_and_scales_the_rest():
    cpu, gpu = _load(), _load(str(REPO / "configs/train/demo_gpu.yaml"))
    assert [(s.name, s.family) for s in gpu.stages] == [(s.name, s.family) for s in cpu.stages]
    assert all(s.shards == "/tmp/tokens" for s in gpu.stages)
    assert gpu.model.parallel_num == cpu.model.parallel_num  # the shards' buckets fit P
    assert gpu.deepspeed.precision == "bf16" and cpu.deepspeed.precision == "fp32"
    assert min(s.token_budget for s in gpu.stages) > 8 * max(s.token_budget for s in cpu.stages)
    assert gpu.model.head.width > cpu.model.head.width


@pytest.mark.parametrize("extract, train", [("demo.yaml", "demo.yaml"),
                                            ("progressive.yaml", "ar_progressive.yaml")])
def test_each_recipe_extracts_the_families_its_training_reads(extract, train):
    """The README's chain extracted shapes.yaml's 64/128 px families for ar_progressive's
    256/512/1024 stages: training refused it at start."""
    ext = load(ExtractConfig, [str(REPO / "configs/extract" / extract)],
               ["inputs=/in/*.tar", "output=/out", "tokenizer=/tok"])
    validate_extract(OmegaConf.to_object(ext))
    cfg = OmegaConf.to_object(load(TrainConfig, [str(REPO / "configs/train" / train)],
                                   ["run_dir=/tmp/r", "data.root=/tmp/tokens",
                                    "data.tokenizer=/tok", "model.backbone.path=/llm"]))
    assert {s.family for s in cfg.stages} == {stage_name(s) for s in ext.stages}
    assert ext.patch_size ** 2 == cfg.model.parallel_num  # bucket sides fit the model's patches


@pytest.mark.parametrize("overlay", ["train/demo_gpu.yaml", "cluster/gpu_shapes_quality.yaml",
                                     "cluster/gpu_1b_mfu.yaml"])
def test_gpu_overlays_buffer_enough_samples_to_fill_a_row(overlay):
    """A row takes whole samples from the stream's buffer: with the demo's 256, stage "32"'s
    16384-token rows (4x4-token images, ~36 tokens a sample) were 58% full on a GPU. Each
    sample holds its image's tokens and at least one more (the lower bound used here)."""
    cfg = _load(str(REPO / "configs" / overlay))
    for stage in cfg.stages:
        side = int(stage.family) // 8  # the demo tokenizer: 8x down
        assert cfg.data.buffer_size * (side * side + 1) >= stage.token_budget, stage.name
