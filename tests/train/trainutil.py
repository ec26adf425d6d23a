"""Helpers for the training tests: token shards written with the real writer, tiny model files."""

from __future__ import annotations

import os

import numpy as np
import webdataset as wds

from bdt.data.token_shards import TokenSample, encode_sample

CAPTIONS = ["a red circle", "two blue squares", "a green star left of a yellow cross",
            "three purple triangles", "a pink square above an orange circle", "one cyan star"]


def write_shards(out_dir: str, grids: list[tuple[int, int]], num_shards: int, per_shard: int,
                 bits: int = 16, seed: int = 0, stage: str = "s") -> list[str]:
    """Token shards of random bits; sample i of shard k has grid grids[(k * per_shard + i) % len]."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    urls = []
    for k in range(num_shards):
        url = os.path.join(out_dir, f"{k:06d}.tar")
        with wds.TarWriter(url, encoder=False) as sink:
            for i in range(per_shard):
                n = k * per_shard + i
                h, w = grids[n % len(grids)]
                packed = rng.integers(0, 256, size=(h, w, bits // 8), dtype=np.uint8)
                sink.write(encode_sample(TokenSample(
                    key=f"s{n:06d}", bits_hwB=packed, bits_per_token=bits, bucket=(w * 16, h * 16),
                    caption=CAPTIONS[n % len(CAPTIONS)], source_key=f"src{n}", source_shard="raw.tar",
                    stage=stage)))
        urls.append(url)
    return urls
