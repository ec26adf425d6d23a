"""Reruns over an existing output: what its markers say must be checked, not trusted.

The units are extracted by the actor's class called directly (what run.py's actors do), so
these tests need no Ray.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil

import pytest
from extract_rawdata import good_samples, image_bytes, write_tar

from bdt.config import load, to_dict
from bdt.data.images import DECODE_VERSION
from bdt.data.token_shards import iter_token_shard
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


def test_a_damaged_first_marker_does_not_hide_another_tokenizers_shards(three_units, other_tokenizer):
    """Only the first marker was read: with it damaged, a rerun with another tokenizer rebuilt
    unit 0 with it, and the family held shards of two tokenizers."""
    out = three_units.output
    with open(mf.marker_url(out, "32", 0), "w") as f:
        f.write('{"schema": 1, "fingerp')
    before = _state(out)
    with pytest.raises(ValueError, match=r"32/000001.done.json was made with fingerprint \w+, this run's"):
        _extract(_cfg(three_units.inputs, out, other_tokenizer))
    assert _state(out) == before



def test_a_run_with_other_stages_is_refused_not_added_beside_the_old_families(three_units):
    """Only the families of this run's config were checked: a run naming other stages passed,
    rewrote index.json without the old family and left shards of two configurations."""
    out = three_units.output
    before = _state(out)
    other = load(ExtractConfig, [], [f"inputs={three_units.inputs}", f"output={out}",
                                     f"tokenizer={three_units.tokenizer}", "stages=[{resolution: 64}]",
                                     "min_side=16", "batch_size=4"])
    with pytest.raises(ValueError, match=r"32/000000.done.json was made with fingerprint \w+, this run's"):
        _extract(other)
    assert _state(out) == before

def test_an_output_of_an_older_image_decoding_is_refused_naming_it(three_units):
    """Markers of a bdt before ICC conversion (no decode_version) were resumed: a rerun filling in
    missing units put converted colours beside unconverted ones, silently."""
    out = three_units.output
    for i in (0, 2):
        marker = json.load(open(mf.marker_url(out, "32", i)))
        marker.pop("decode_version", None)
        with open(mf.marker_url(out, "32", i), "w") as f:
            json.dump(marker, f)
    os.remove(mf.marker_url(out, "32", 1))  # the unit a rerun would fill in
    before = _state(out)
    with pytest.raises(ValueError, match=rf"32/000000.done.json was made with image decoding version 1, "
                                         rf"this bdt's is {DECODE_VERSION} .*write to a new output"):
        _extract(three_units)
    assert _state(out) == before


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


def test_an_input_replaced_in_place_is_refused_until_its_marker_goes(three_units):
    """The plan recorded names only: a tar rewritten with other samples kept its old shard."""
    out, src = three_units.output, three_units.inputs.replace("{0..2}", "1")
    write_tar(src, good_samples("new_", 3, 50))
    before = _state(out)
    with pytest.raises(ValueError, match=rf"input {src} changed since {out}/32/000001.done.json was made "
                                         rf"from it .*delete {out}/\*/000001.done.json to redo that unit"):
        _extract(three_units)
    assert _state(out) == before
    os.remove(mf.marker_url(out, "32", 1))
    assert _extract(three_units)["skipped_units"] == 2
    keys = sorted(s.source_key for s in iter_token_shard(mf.shard_url(out, "32", 1)))
    assert keys == ["new_0000", "new_0001", "new_0002"]


def test_a_folder_caption_changed_in_place_is_refused(tmp_path, tiny_tokenizer):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        (folder / f"p{i}.png").write_bytes(image_bytes(40, 40, seed=i))
        (folder / f"p{i}.txt").write_text("a caption")
    cfg = _cfg(str(folder), str(tmp_path / "out"), tiny_tokenizer)
    _extract(cfg)
    (folder / "p1.txt").write_text("another, longer caption")
    with pytest.raises(ValueError, match=f"input {folder}#000000 changed since"):
        _extract(cfg)
    shutil.rmtree(tmp_path / "out")
    assert _extract(cfg)["stages"]["32"]["samples"] == 2


def test_another_spelling_of_the_inputs_resumes_also_an_earlier_bdts_output(tmp_path, tiny_tokenizer, monkeypatch):
    """`inputs=./photos/` after `inputs=photos` was refused as other inputs. An output an earlier
    bdt made names them as spelled in its plan and markers: it resumes, and is checked, too."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        (folder / f"p{i}.png").write_bytes(image_bytes(40, 40, seed=i))
        (folder / f"p{i}.txt").write_text("a caption")
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    _extract(_cfg("photos", out, tiny_tokenizer))
    shards = {p: h for p, h in _state(out).items() if "/32/" in p}
    assert _extract(_cfg("./photos/", out, tiny_tokenizer))["skipped_units"] == 1
    # What an earlier bdt wrote: no plan schema, the input as spelled in plan and marker.
    plan = json.load(open(f"{out}/plan.json"))
    assert plan["units"][0]["source"] == str(folder)
    plan["units"][0]["source"] = "photos"
    del plan["schema"]
    with open(f"{out}/plan.json", "wb") as f:
        f.write(mf.json_bytes(plan))
    marker = json.load(open(mf.marker_url(out, "32", 0)))
    with open(mf.marker_url(out, "32", 0), "w") as f:
        json.dump(dict(marker, source="photos#000000"), f)
    assert _extract(_cfg(f"{folder}", out, tiny_tokenizer))["skipped_units"] == 1
    assert {p: h for p, h in _state(out).items() if "/32/" in p and "done" not in p} == \
        {p: h for p, h in shards.items() if "done" not in p}
    assert json.load(open(f"{out}/plan.json"))["schema"] == mf.PLAN_SCHEMA
    (folder / "p1.txt").write_text("another, longer caption")
    with pytest.raises(ValueError, match=f"input {folder}#000000 changed since"):
        _extract(_cfg("./photos", out, tiny_tokenizer))
