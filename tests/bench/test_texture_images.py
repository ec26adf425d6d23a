"""bench/texture_images.py's texture score: a dotted texture scores high, drawn images low."""

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
