"""Reruns over an existing output: what its markers say must be checked, not trusted.

The units are extracted by the actor's class called directly (what run.py's actors do), so
these tests need no Ray.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import pytest
from extract_rawdata import good_samples, write_tar

from bdt.config import load, to_dict
from bdt.extract import manifest as mf
from bdt.extract import run as R
from bdt.extract.config import ExtractConfig
from bdt.extract.worker import ShardEncoder


def _cfg(inputs: str, output: str, tokenizer: str) -> ExtractConfig:
    return load(ExtractConfig, [], [f"inputs={inputs}", f"output={output}", f"tokenizer={tokenizer}",
                                    "stages=[{resolution: 32}]", "min_side=16", "batch_size=4"])


def _extract(cfg: ExtractConfig) -> dict:
    """plan, every unit through ShardEncoder.process, then the manifest (run.py without Ray)."""
    with mf.output_lock(cfg.output):
        units, stages, identity, fp = R.plan(cfg)
        encoder = ShardEncoder(to_dict(cfg), fp, stages)
        results = {u.index: encoder.process(u.to_dict()) for u in units}
        return R._finish(cfg, units, stages, identity, results, {}, 1.0, 0)


def _state(out: str) -> dict[str, str]:
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in glob.glob(out + "/**", recursive=True) if os.path.isfile(p)}


@pytest.fixture
def three_units(tmp_path, tiny_tokenizer) -> ExtractConfig:
    for i in range(3):
        write_tar(str(tmp_path / f"in-{i}.tar"), good_samples(f"s{i}_", 2, 10 * i))
    cfg = _cfg(f"{tmp_path}/in-{{0..2}}.tar", str(tmp_path / "out"), tiny_tokenizer)
    _extract(cfg)
    return cfg


def test_a_marker_edited_by_hand_is_redone_not_trusted(three_units):
    """Marker 1 saying it is unit 2 with 999 samples went into index.json as a second shard 2."""
    out = three_units.output
    url = mf.marker_url(out, "32", 1)
    with open(url) as f:
        marker = json.load(f)
    marker.update(samples=999, index=2)
    with open(url, "w") as f:
        json.dump(marker, f)
    summary = _extract(three_units)
    assert summary["skipped_units"] == 2
    index = json.load(open(os.path.join(out, "index.json")))
    assert [(s["shard"], s["samples"]) for s in index["stages"]["32"]["shards"]] == [
        ("32/000000.tar", 2), ("32/000001.tar", 2), ("32/000002.tar", 2)]


