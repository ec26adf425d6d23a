"""Configuration values that pass their types but could never work are refused by plan(), naming
the key, before the output is touched; values with two spellings are made one."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from extract_rawdata import good_samples, image_bytes, write_tar

from bdt.config import load, to_dict
from bdt.extract import manifest as mf
from bdt.extract.config import ExtractConfig
from bdt.extract.run import plan
from bdt.extract.worker import ShardEncoder


def _cfg(tmp_path, tokenizer: str, *extra: str, inputs: str = "") -> ExtractConfig:
    if not inputs:
        inputs = str(tmp_path / "in.tar")
        write_tar(inputs, good_samples("a", 3, 0))
    return load(ExtractConfig, [], [f"inputs={inputs}", f"output={tmp_path}/out", f"tokenizer={tokenizer}",
                                    "stages=[{resolution: 32}]", "min_side=16", "batch_size=4", *extra])


def test_upper_case_image_extensions_read_tars_and_folders_alike(tmp_path, tiny_tokenizer):
    """[PNG, JPG] passed the checks, then no tar member matched (their extensions are read lower
    case) and each folder image was both encoded and rejected as a stray."""
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(2):
        (folder / f"p{i}.png").write_bytes(image_bytes(40, 40, seed=i))
        (folder / f"p{i}.txt").write_text("a caption")
    write_tar(str(tmp_path / "in.tar"), good_samples("a", 3, 0)[:1])  # one png sample
    cfg = _cfg(tmp_path, tiny_tokenizer, "image_extensions=[PNG,JPG]", inputs=f"{tmp_path}/in.tar,{folder}")
    with mf.output_lock(cfg.output):
        units, stages, _, fp = plan(cfg)
    assert list(cfg.image_extensions) == ["png", "jpg"]
    encoder = ShardEncoder(to_dict(cfg), fp, stages)
    markers = [encoder.process(u.to_dict())["stages"]["32"] for u in units]
    assert [(m["samples"], m["rejected"]) for m in markers] == [(1, 0), (2, 0)]


def test_a_batch_size_far_above_a_shards_images_pads_each_bucket_little(tmp_path, tiny_tokenizer):
    """Short batches were padded to a quarter of batch_size: at 4000, each of these three
    single-image buckets was encoded as 1000 images."""
    cfg = _cfg(tmp_path, tiny_tokenizer, "batch_size=4000")
    with mf.output_lock(cfg.output):
        units, stages, _, fp = plan(cfg)
    encoder = ShardEncoder(to_dict(cfg), fp, stages)
    encode, sizes = encoder.model.encode, []
    encoder.model.encode = lambda x: sizes.append(len(x)) or encode(x)
    assert encoder.process(units[0].to_dict())["stages"]["32"]["samples"] == 3
    assert sizes == [1, 1, 1]

@pytest.mark.parametrize("name", ["index.json", "plan.json", "config.yaml", "lock.json", "rejects.jsonl",
                                  "rejects", ".hidden"])
def test_stage_names_of_the_outputs_own_files_are_refused(tmp_path, tiny_tokenizer, name):
    """A family named like the output's manifest, plan, lock or rejects crashed late or
    overwrote them."""
    cfg = _cfg(tmp_path, tiny_tokenizer, f"stages=[{{resolution: 32, name: '{name}'}}]")
    with pytest.raises(ValueError, match=rf"stages\[0\]: name '{name}' .*none of the output's own "
                                         rf"\['index.json', 'plan.json', 'rejects.jsonl', 'lock.json'"):
        plan(cfg)
    assert not os.path.exists(cfg.output)


@pytest.mark.parametrize("extra,message", [
    (["image_extensions=[png,pdf]"], r"image_extensions: 'pdf' \(PDF\) is refused: PIL can write it, not read it"),
    (["image_extensions=[eps]"], r"image_extensions: 'eps' \(EPS\) is refused: read through Ghostscript"),
    (["min_side=1000", "max_pixels=100"], "min_side: 1000 px a side needs 1000000 pixels, more than max_pixels 100"),
    # the token readers skip a longer caption: every such sample would be extracted for nothing
    (["max_caption_bytes=1048577"], r"max_caption_bytes: must be <= 1048576 \(the most the token readers"),
])
def test_filters_that_could_never_pass_an_image_are_refused(tmp_path, tiny_tokenizer, extra, message):
    cfg = _cfg(tmp_path, tiny_tokenizer, *extra)
    with pytest.raises(ValueError, match=message):
        plan(cfg)
    assert not os.path.exists(cfg.output)


def test_a_release_layout_tokenizer_works_and_its_weights_file_is_refused(tmp_path, tiny_tokenizer):
    """load_tokenizer reads ae.safetensors + ae_config.json; planning looked for config.json only
    and failed, and a weights-file path failed with NotADirectoryError."""
    release = tmp_path / "release"
    release.mkdir()
    shutil.copy(os.path.join(tiny_tokenizer, "model.safetensors"), release / "ae.safetensors")
    shutil.copy(os.path.join(tiny_tokenizer, "config.json"), release / "ae_config.json")
    units, stages, identity, _ = plan(_cfg(tmp_path, str(release)))
    assert len(units) == 1 and identity["downsample_factor"] == 4
    assert set(identity["sha256"]) == {"ae.safetensors", "ae_config.json"}
    weights = str(release / "ae.safetensors")
    with pytest.raises(ValueError, match=f"tokenizer: {weights} is a file; give the directory holding it"):
        plan(_cfg(tmp_path, weights))
    assert json.load(open(tmp_path / "out" / "plan.json"))["units"][0]["source"] == str(tmp_path / "in.tar")


def test_a_tokenizer_whose_weights_do_not_fit_its_config_is_refused_before_ray(tmp_path, tiny_tokenizer):
    """Only config.json was read before Ray started: every actor then failed to start and each
    unit was reported failed, 'rerun to retry', exit 1."""
    tokenizer = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer, tokenizer)
    config = json.loads((tokenizer / "config.json").read_text())
    (tokenizer / "config.json").write_text(json.dumps(dict(config, z_channels=32)))
    with pytest.raises(ValueError, match=r"model.safetensors does not fit the tokenizer .*z_channels=32"):
        plan(_cfg(tmp_path, str(tokenizer)))
    assert not os.path.exists(tmp_path / "out")


def test_a_tokenizer_linking_out_of_its_folder_is_refused_before_its_files_are_read(
        tmp_path, tiny_tokenizer):
    """The trainer refuses such a tokenizer (its export copies the folder): an extraction with it
    was wasted, and hashing its files for the manifest read whatever the link named (a link to
    /dev/zero never ended)."""
    tokenizer = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer, tokenizer)
    (tmp_path / "secret").write_text("PRIVATE KEY")
    (tokenizer / "notes.txt").symlink_to(tmp_path / "secret")
    with pytest.raises(ValueError, match=f"^tokenizer = {tokenizer}: notes.txt is a symlink to "
                                         f"{tmp_path}/secret, outside the folder"):
        plan(_cfg(tmp_path, str(tokenizer)))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("key,value,shown", [
    ("output", "tokens/out", "tokens/out"), ("inputs", "/data/a.tar,raw/in-{0..2}.tar", "raw/in-0.tar"),
])
def test_relative_paths_are_refused_under_ray_job_submit(tmp_path, tiny_tokenizer, monkeypatch, capsys,
                                                        key, value, shown):
    """The job's driver runs in Ray's temporary copy of --working-dir: a relative output landed
    there and was lost. The job supervisor marks its driver with RAY_JOB_CONFIG_JSON_ENV_VAR."""
    from test_extract_inputs import _pipeline_main

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.chdir(tmp_path)
    args = {"inputs": f"{tmp_path}/in.tar", "output": f"{tmp_path}/out", "tokenizer": tiny_tokenizer, key: value}
    with pytest.raises(SystemExit) as exit_info:
        _pipeline_main([f"{k}={v}" for k, v in args.items()])
    assert exit_info.value.code == 2
    assert f"{key}: '{shown}' is relative; under `ray job submit`" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
