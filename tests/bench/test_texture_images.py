"""bench/texture_images.py's texture score: a dotted texture scores high, drawn images low."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from testkit import REPO

sys.path.insert(0, str(REPO / "bench"))

import texture_images  # noqa: E402  (bench/ is not a package)


def image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def test_dots_score_high_objects_and_noise_low(tmp_path):
    rng = np.random.default_rng(0)
    plain = np.full((64, 64, 3), 62.0)
    noisy = plain + rng.normal(0, 4, plain.shape)  # the dataset's sensor noise
    drawn = noisy.copy()
    drawn[16:48, 20:44] = (150, 50, 210)  # a big purple square
    dotted = plain.copy()
    dotted[::2, ::2] += (40, 10, 50)  # a violet dot every other pixel
    scores = [texture_images.texture_score(image(a)) for a in (plain, noisy, drawn, dotted)]
    assert scores[0] == 0.0 and max(scores[1:3]) < 0.5 < texture_images.TEXTURE_LEVELS < scores[3]
    (tmp_path / "images").mkdir()
    for name, a in (("a", drawn), ("b", dotted), ("c", noisy)):
        image(a).save(tmp_path / "images" / f"{name}.png")
    counted = texture_images.count_textures(str(tmp_path))
    assert (counted["images"], counted["files"]) == (3, ["b.png"])
    assert counted["rate"] == pytest.approx(1 / 3)
    with pytest.raises(FileNotFoundError, match="no images"):
        texture_images.count_textures(str(tmp_path / "images"))


def test_main_writes_picture_and_json_into_a_new_results_folder(tmp_path, monkeypatch):
    """BDT_BENCH_RESULTS may name a folder not made yet: the picture was saved before anything
    made it, and the run ended in a traceback after all its work."""
    import common

    results = tmp_path / "results"
    monkeypatch.setattr(common, "RESULTS", str(results))
    monkeypatch.setattr(texture_images, "RESULTS", str(results))
    grey = [image(np.full((64, 64, 3), 62.0))] * texture_images.SHOWN
    # No tokenizer here: the "decoded" rows are the training images themselves.
    monkeypatch.setattr(texture_images, "dark_training_images", lambda data, bg, px: grey)
    monkeypatch.setattr(texture_images, "decode_out_of_place",
                        lambda tok, images: {"training images": images, "decoded": images})
    (tmp_path / "eval" / "images").mkdir(parents=True)
    grey[0].save(tmp_path / "eval" / "images" / "a.png")
    monkeypatch.setattr(sys, "argv", ["texture_images.py", "--evals", str(tmp_path / "eval")])
    assert texture_images.main() == 0
    assert Image.open(results / "texture_images.png").size == (64 * texture_images.SHOWN, 128)
    d = json.loads((results / "texture_images.json").read_text())["results"]
    assert d["evals"][0]["images"] == 1 and d["decoding"]["rows"] == ["training images", "decoded"]
