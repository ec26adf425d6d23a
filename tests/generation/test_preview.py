"""The in-loop sample grid: real generation + decode, and no draw from the global RNG."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from bdt.config import load
from bdt.generation.preview import sample_grid, save_grid
from bdt.model.ar import BitDanceModel
from bdt.tokenizer.io import load_tokenizer
from bdt.training.ar.config import TrainConfig
from testkit import TINY_CONFIG
from trainutil import tiny_image_tokenizer, tiny_llm


def test_sample_grid_png_leaves_training_rng_alone(tmp_path):
    cfg = OmegaConf.to_object(load(TrainConfig, [TINY_CONFIG], [
        f"model.backbone.path={tiny_llm(str(tmp_path / 'llm'))}", "stages=[{name: a, shards: x, steps: 1}]"]))
    model = BitDanceModel.from_config(cfg.model)
    decoder = load_tokenizer(tiny_image_tokenizer(str(tmp_path / "tok")))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    image = sample_grid(model, decoder, ["a red circle", "one cyan star"], (4, 6), num_steps=2, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert image.size == (2 * 6 * 2, 4 * 2)  # two images side by side, 2x decoder upsampling
    again = sample_grid(model, decoder, ["a red circle", "one cyan star"], (4, 6), num_steps=2, seed=7)
    assert np.array_equal(np.asarray(again), np.asarray(image))
    path = save_grid(image, str(tmp_path / "run"), 12)
    assert path.endswith("samples/step_000000012.png") and Image.open(path).size == image.size


def test_a_stop_before_the_preview_makes_and_writes_nothing(tmp_path, monkeypatch):
    """The grid is one batch: the stop point, asked once before it (together only where every
    rank generates it, ZeRO-3), ends the task there."""
    import bdt.generation.preview as preview
    from bdt.training.ar.config import ARLoggingConfig

    class Cut(Exception):
        pass

    def stop(together: bool) -> None:
        asked.append(together)
        raise Cut

    monkeypatch.setattr(preview, "sample_grid", lambda *a: pytest.fail("generated"))
    cfg = ARLoggingConfig(sample_every=2)
    for together in (False, True):
        asked = []
        task = preview.Preview(cfg, None, str(tmp_path / "run"), 0, takes_part=True, writes=True,
                               together=together)
        with pytest.raises(Cut):
            task.run(2, None, stop)
        assert asked == [together]
    assert not (tmp_path / "run").exists()
