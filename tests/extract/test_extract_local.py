"""Pre-extraction on a local Ray: outputs, manifest, rejects, rerun, partial rerun, folders, S3.

The tests in this module share one Ray instance and one first run. A test that reruns or damages
an output works on its own copy of the first run's output (`own_output`), so the tests pass in
any order and alone.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import threading
import time

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds
from extract_rawdata import (BAD_REASONS, MAX_CAPTION_BYTES, MAX_PIXELS, MIN_SIDE, bad_samples,
                             good_samples, image_bytes, truncate, write_tar)

from bdt.config import load
from bdt.data.images import load_for_buckets
from bdt.data.shard_source import list_shards
from bdt.data.token_shards import decode_sample, iter_token_shard
from bdt.extract.config import ExtractConfig
from bdt.extract.run import run
from bdt.tokenizer import load_tokenizer, pack_bits

pytestmark = pytest.mark.slow

STAGES = "[{resolution: 32}, {resolution: 64, name: hi}]"


def make_cfg(inputs: str, output: str, tokenizer: str, *extra: str) -> ExtractConfig:
    return load(ExtractConfig, [], [f"inputs={inputs}", f"output={output}", f"tokenizer={tokenizer}",
                                    f"stages={STAGES}", f"min_side={MIN_SIDE}", f"max_pixels={MAX_PIXELS}",
                                    f"max_caption_bytes={MAX_CAPTION_BYTES}",
                                    "batch_size=4", "progress_interval_s=0.5", "num_actors=1", *extra])


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """3 tar shards: 9 good; 4 good + every bad kind; 6 good then truncated mid-member."""
    root = tmp_path_factory.mktemp("raw")
    samples = {0: good_samples("a", 9, 0), 1: good_samples("b", 4, 100) + bad_samples(),
               2: good_samples("c", 6, 200)}
    for i, s in samples.items():
        write_tar(str(root / f"in-{i:06d}.tar"), s)
    truncate(str(root / "in-000002.tar"), 0.6)
    originals = {}
    for i, s in samples.items():
        for sample in s:
            image = next((v for k, v in sample.items() if k in ("png", "jpg", "webp")), None)
            originals[(str(root / f"in-{i:06d}.tar"), sample["__key__"])] = image
    return str(root / "in-{000000..000002}.tar"), originals


@pytest.fixture(scope="module")
def first_run(raw, tiny_tokenizer, ray_local, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    cfg = make_cfg(raw[0], out, tiny_tokenizer, "num_actors=2")  # the pool proper; 1 elsewhere (faster)
    return cfg, run(cfg)


@pytest.fixture
def own_output(first_run, raw, tiny_tokenizer, tmp_path) -> ExtractConfig:
    """The first run's config with its output copied to this test's directory (mtimes kept)."""
    out = str(tmp_path / "own")
    shutil.copytree(first_run[0].output, out)
    return make_cfg(raw[0], out, tiny_tokenizer, "num_actors=2")


def _index(out: str) -> dict:
    with open(os.path.join(out, "index.json")) as f:
        return json.load(f)


def _rejects(out: str) -> list[dict]:
    with open(os.path.join(out, "rejects.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _keys_per_shard(out: str) -> dict[str, list[str]]:
    return {os.path.relpath(p, out): [s["__key__"] for s in wds.WebDataset(p, shardshuffle=False)]
            for p in sorted(glob.glob(os.path.join(out, "*", "*.tar")))}


def _file_state(out: str) -> dict[str, tuple[float, str]]:
    state = {}
    for p in sorted(glob.glob(os.path.join(out, "**", "*"), recursive=True)):
        if os.path.isfile(p):
            state[os.path.relpath(p, out)] = (os.stat(p).st_mtime_ns, hashlib.sha256(open(p, "rb").read()).hexdigest())
    return state


def test_shards_hold_direct_encodings_and_manifest_checks_out(first_run, raw, tiny_tokenizer):
    cfg, summary = first_run
    out, originals = cfg.output, raw[1]
    assert summary["done_units"] == 3 and not summary["failed_units"]
    index = _index(out)
    assert index["complete"] and index["tokenizer"]["bits_per_token"] == 16
    assert index["tokenizer"]["sha256"]["model.safetensors"] == hashlib.sha256(
        open(os.path.join(tiny_tokenizer, "model.safetensors"), "rb").read()).hexdigest()
    model = load_tokenizer(tiny_tokenizer)
    bucket_lists = [[tuple(b) for b in index["stages"][s]["buckets"]] for s in ("32", "hi")]
    for stage_i, stage in enumerate(("32", "hi")):
        info = index["stages"][stage]
        assert [s["shard"] for s in info["shards"]] == [f"{stage}/{i:06d}.tar" for i in range(3)]
        written = upscaled = 0
        for entry in info["shards"]:
            path = os.path.join(out, entry["shard"])
            data = open(path, "rb").read()
            assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
            raw_samples = list(wds.WebDataset(path, shardshuffle=False))  # plain webdataset reads it
            assert len(raw_samples) == entry["samples"] == entry["inputs"] - entry["rejected"]
            assert len({s["__key__"] for s in raw_samples}) == len(raw_samples)
            smaller = 0  # samples whose image is smaller than their bucket: upscaled
            for rs in raw_samples:
                s = decode_sample(rs)
                image = originals[(s.source_shard, s.source_key)]
                bucket, pixels, up = load_for_buckets(image, bucket_lists, max_pixels=MAX_PIXELS,
                                                      min_side=MIN_SIDE)[stage_i]
                smaller += up
                assert s.bucket == bucket and s.grid == (bucket[1] // 4, bucket[0] // 4)
                x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
                np.testing.assert_array_equal(s.bits_hwB, pack_bits(model.encode(x).numpy())[0])
                assert s.caption == f"sample {s.source_key[0]} {int(s.source_key[1:])}"
            assert entry["upscaled"] == smaller
            written += len(raw_samples)
            upscaled += smaller
        assert written == info["totals"]["samples"] == summary["stages"][stage]["samples"]
        assert upscaled == info["totals"]["upscaled"] == summary["stages"][stage]["upscaled"]
        t = summary["stages"][stage]
        assert t["inputs"] == t["samples"] + t["rejected"]
    # every image (24-64 px) is upscaled to the 64 px stage's buckets, none to the 32 px ones
    assert summary["stages"]["hi"]["upscaled"] == summary["stages"]["hi"]["samples"] > 0
    assert summary["stages"]["32"]["upscaled"] == 0
    # Every good sample of the two intact shards is written; the truncated shard lost some.
    keys = {s.key for s in iter_token_shard(os.path.join(out, "hi", "000000.tar"))}
    keys |= {s.key for s in iter_token_shard(os.path.join(out, "hi", "000001.tar"))}
    assert keys == {f"a{i:04d}" for i in range(9)} | {f"b{i:04d}" for i in range(4)}
    assert 0 < index["stages"]["hi"]["shards"][2]["samples"] < 6


def test_every_bad_input_kind_is_rejected_with_its_reason(first_run):
    cfg, summary = first_run
    rejects = _rejects(cfg.output)
    mine = [r for r in rejects if r["source"].endswith("in-000001.tar")]
    assert sorted((r["key"], r["reason"]) for r in mine) == sorted(BAD_REASONS.items())  # one each
    details = {r["key"]: r["detail"] for r in mine}
    assert f"max_caption_bytes {MAX_CAPTION_BYTES}" in details["bad_longcap"]
    assert details["bad_nul"] == "U+0000 at character 5"
    unit1 = next(s for s in _index(cfg.output)["stages"]["32"]["shards"] if s["source"].endswith("in-000001.tar"))
    assert unit1["inputs"] == 4 + len(bad_samples())  # one verdict per sample, not per tar member
    truncated = [r for r in rejects if r["source"].endswith("in-000002.tar")]
    assert truncated and all(r["reason"] == "truncated_tar" for r in truncated)
    assert len(rejects) == summary["stages"]["32"]["rejected"] == summary["stages"]["hi"]["rejected"]
    assert sum(summary["rejects_by_reason"].values()) == len(rejects)


def test_rerun_is_a_noop(own_output):
    cfg = own_output
    before = _file_state(cfg.output)
    summary = run(cfg)
    assert summary["skipped_units"] == 3 and summary["done_units"] == 3
    after = _file_state(cfg.output)
    shard_files = [k for k in before if k.endswith((".tar", ".done.json")) or k.startswith("rejects/")]
    assert shard_files and all(after[k] == before[k] for k in shard_files)  # same mtime and sha256
    assert _index(cfg.output)["stages"]["hi"]["totals"] == json.loads(
        json.dumps(summary["stages"]["hi"]))


def test_a_shard_made_before_upscales_were_counted_is_kept_its_count_unknown(own_output, capsys):
    """A marker an earlier bdt wrote has no `upscaled`: the rerun keeps its shard (the same
    bytes) and says the stage's count is unknown rather than a sum short of it."""
    cfg = own_output
    url = os.path.join(cfg.output, "hi", "000001.done.json")
    marker = json.loads(open(url).read())
    del marker["upscaled"]
    with open(url, "w") as f:
        json.dump(marker, f)
    summary = run(cfg)
    assert summary["skipped_units"] == 3
    hi = summary["stages"]["hi"]
    assert hi["upscaled"] is None and summary["stages"]["32"]["upscaled"] == 0
    assert [e["upscaled"] is None for e in _index(cfg.output)["stages"]["hi"]["shards"]] == \
        [False, True, False]
    assert f"stage hi: inputs {hi['inputs']} = written {hi['samples']} + rejected {hi['rejected']} " \
           f"[ok], ? upscaled" in capsys.readouterr().out


def test_changed_settings_or_inputs_refuse_to_mix_into_an_output(own_output, raw, tiny_tokenizer, tmp_path):
    cfg = own_output
    before = _file_state(cfg.output)
    with pytest.raises(ValueError, match="fingerprint"):
        run(make_cfg(raw[0], cfg.output, tiny_tokenizer, "min_side=20"))
    other = tmp_path / "other.tar"
    write_tar(str(other), good_samples("z", 2, 7))
    with pytest.raises(ValueError, match="input unit 0 was .*in-000000.tar"):
        run(make_cfg(f"{other},{raw[0]}", cfg.output, tiny_tokenizer))
    assert _file_state(cfg.output) == before


def test_a_shard_damaged_after_extraction_is_found_and_a_rerun_repairs_it(own_output, capsys):
    """Training checks the sizes in index.json at start; `bdt data verify` the sha256 too."""
    from bdt.cli import main as bdt_main

    out = own_output.output
    assert bdt_main(["data", "verify", out]) == 0
    assert capsys.readouterr().out.endswith("all match index.json\n")
    flipped, cut = os.path.join(out, "hi", "000001.tar"), os.path.join(out, "32", "000002.tar")
    data = open(flipped, "rb").read()
    open(flipped, "wb").write(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
    truncate(cut, 0.5)
    list_shards(out, "hi")  # same size: only the full check sees it
    with pytest.raises(ValueError, match=f"e.g. {cut}: .* bytes listed, .* found"):
        list_shards(out, "32")
    assert bdt_main(["data", "verify", out]) == 1
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()[:-1]] == [
        f"BAD {cut}", f"BAD {flipped}"]
    assert run(own_output)["done_units"] == 3
    assert list_shards(out, "32").urls and bdt_main(["data", "verify", out]) == 0


def test_partial_output_is_completed_with_the_same_keys(own_output, raw, tiny_tokenizer):
    out = own_output.output
    keys_before = _keys_per_shard(out)
    state_before = _file_state(out)
    os.remove(os.path.join(out, "hi", "000001.done.json"))  # marker lost: shard redone
    truncate(os.path.join(out, "32", "000002.tar"), 0.5)  # marker present, sha mismatch: redone
    os.remove(os.path.join(out, "32", "000000.done.json"))
    stale = os.path.join(out, "32", ".000000.tar.tmp-deadbeef")  # a killed writer's temp file
    open(stale, "wb").write(b"partial")
    os.remove(os.path.join(out, "index.json"))
    with pytest.raises(ValueError, match="extraction output without index.json"):  # a killed run's output
        list_shards(out, "hi")
    # Decoding ahead in threads must not change a byte (order and content are kept).
    summary = run(make_cfg(raw[0], out, tiny_tokenizer, "decode_threads=2"))
    assert summary["done_units"] == 3 and summary["skipped_units"] == 0 and not summary["failed_units"]
    assert not os.path.exists(stale)
    keys_after = _keys_per_shard(out)
    assert keys_after == keys_before
    assert all(len(set(k)) == len(k) for k in keys_after.values())
    state_after = _file_state(out)
    for name in ("hi/000000.tar", "32/000001.tar", "hi/000002.tar"):  # valid: untouched
        assert state_after[name] == state_before[name]
    for name in ("hi/000001.tar", "32/000002.tar", "32/000000.tar"):  # rebuilt byte-identical
        assert state_after[name][1] == state_before[name][1]
    assert os.path.exists(os.path.join(out, "index.json"))


def test_folder_input(tmp_path, tiny_tokenizer, ray_local):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        (folder / ("sub" if i % 2 else "") / f"img.{i}.png").write_bytes(image_bytes(40, 32, seed=i))
        (folder / ("sub" if i % 2 else "") / f"img.{i}.txt").write_text(f"caption {i}")
    (folder / "nocap.jpg").write_bytes(image_bytes(40, 40, fmt="JPEG"))
    (folder / "orphan.txt").write_text("no image")
    (folder / "notes.md").write_text("?")
    (folder / "._img.0.png").write_bytes(b"AppleDouble")  # hidden: neither read nor rejected
    (folder / ".DS_Store").write_bytes(b"Bud1")
    out = str(tmp_path / "out")
    summary = run(make_cfg(str(folder), out, tiny_tokenizer, "folder_shard_size=4"))
    assert summary["units"] == 2 and not summary["failed_units"]
    assert summary["stages"]["32"] == {**summary["stages"]["32"], "inputs": 8, "samples": 5, "rejected": 3}
    reasons = {r["key"]: r["reason"] for r in _rejects(out)}
    assert reasons == {"nocap": "missing_caption", "orphan.txt": "missing_image", "notes.md": "unknown_extension"}
    keys = {s.key: s for p in sorted(glob.glob(f"{out}/hi/*.tar")) for s in iter_token_shard(p)}
    assert sorted(keys) == sorted(["img_0", "sub_img_1", "img_2", "sub_img_3", "img_4"])
    assert keys["sub_img_3"].source_key == "sub/img.3" and keys["sub_img_3"].caption == "caption 3"
    # The same folder spelled otherwise is the same input: its shards are kept.
    assert run(make_cfg(f"{tmp_path}/./photos/", out, tiny_tokenizer, "folder_shard_size=4"))["skipped_units"] == 2


def test_s3_inputs_and_outputs(first_run, raw, tiny_tokenizer, s3_bucket):
    local_cfg, _ = first_run
    fs = fsspec.filesystem("s3")
    for path in sorted(glob.glob(raw[0].replace("{000000..000002}", "*"))):
        fs.put_file(path, f"{s3_bucket[5:]}/raw/{os.path.basename(path)}")
    out = f"{s3_bucket}/tokens"
    cfg = make_cfg(f"{s3_bucket}/raw/in-*.tar", out, tiny_tokenizer)
    summary = run(cfg)
    assert summary["done_units"] == 3 and not summary["failed_units"]
    with fsspec.open(f"{out}/index.json") as f:
        index = json.load(f)
    local_index = _index(local_cfg.output)
    for stage in ("32", "hi"):
        assert index["stages"][stage]["totals"] == local_index["stages"][stage]["totals"]
        for entry in index["stages"][stage]["shards"]:
            samples = list(iter_token_shard(f"{out}/{entry['shard']}"))
            assert len(samples) == entry["samples"]
            assert all(s.source_shard.startswith(f"{s3_bucket}/raw/") for s in samples)
            # Same tokens as the local run: the content does not depend on where data is stored.
            local = {s.key: s.bits_hwB for s in iter_token_shard(os.path.join(local_cfg.output, entry["shard"]))}
            assert sorted(local) == sorted(s.key for s in samples)
            assert all(np.array_equal(local[s.key], s.bits_hwB) for s in samples)
    assert not [p for p in fs.find(s3_bucket[5:]) if ".tmp-" in p or p.endswith(".part")]
    assert run(cfg)["skipped_units"] == 3


def test_worker_killed_mid_shard_is_retried(tmp_path, tiny_tokenizer, ray_local):
    import psutil

    for i in range(2):
        write_tar(str(tmp_path / f"in-{i}.tar"), good_samples(f"k{i}", 30, 300 + 50 * i))
    out = str(tmp_path / "out")
    cfg = make_cfg(str(tmp_path / "in-*.tar"), out, tiny_tokenizer, "batch_size=1", "max_retries=2")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=run(cfg)))
    thread.start()
    actor, victim = None, None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline and thread.is_alive():
        if actor is None:  # only processes this test started; found first so the kill is immediate
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "ShardEncoder" in " ".join(proc.cmdline()):
                        actor = proc
        elif glob.glob(f"{out}/*/.*.tar.tmp-*"):  # a shard is half written right now
            actor.kill()
            victim = actor
        time.sleep(0.002)
    thread.join(timeout=300)
    assert victim is not None, "the shard finished before a worker could be killed"
    assert not psutil.wait_procs([victim], timeout=10)[1]  # it really died; Ray made a new actor
    summary = result["summary"]
    assert not summary["failed_units"] and summary["done_units"] == 2
    keys = [k for p in sorted(glob.glob(f"{out}/32/*.tar")) for k in _keys_per_shard(out)[os.path.relpath(p, out)]]
    assert sorted(keys) == sorted(f"k{i}{j:04d}" for i in range(2) for j in range(30))  # all, once
    assert not glob.glob(f"{out}/*/.*.tmp-*")


def test_progress_counts_inside_a_shard(tmp_path, tiny_tokenizer, ray_local, capfd):
    """The bar's postfix moves while the only shard is still being written (polled from the
    actor's progress thread), and its final line agrees with the summary."""
    import re

    write_tar(str(tmp_path / "in.tar"), good_samples("p", 40, 500) + bad_samples()[:2])
    summary = run(make_cfg(str(tmp_path / "in.tar"), str(tmp_path / "out"), tiny_tokenizer,
                           "batch_size=1", "progress_interval_s=0.2"))
    lines = re.split(r"[\r\n]+", capfd.readouterr().err)
    mid = [int(m.group(1)) for line in lines if " 0/1 " in line and (m := re.search(r"images=(\d+)", line))]
    assert any(0 < n < 40 for n in mid), lines[-5:]
    final = [line for line in lines if " 1/1 " in line][-1]
    assert "images=40" in final and "rejects=2" in final and summary["stages"]["32"]["rejected"] == 2


def test_a_failing_unit_is_reported_and_the_others_finish(own_output):
    cfg = own_output
    marker = os.path.join(cfg.output, "hi", "000001.done.json")
    with open(marker) as f:
        data = json.load(f)
    # Unit 1 now claims another source: its task raises (another fingerprint is refused before
    # any work, test_extract_resume.py).
    with open(marker, "w") as f:
        json.dump(dict(data, source="elsewhere.tar"), f)
    summary = run(cfg)
    assert list(summary["failed_units"]) == ["1"] and "source elsewhere.tar" in summary["failed_units"]["1"]
    assert summary["done_units"] == 2 and summary["skipped_units"] == 2
    index = _index(cfg.output)
    assert index["complete"] is False
    assert [s["shard"] for s in index["stages"]["32"]["shards"]] == ["32/000000.tar", "32/000002.tar"]
    with pytest.raises(ValueError, match=r"index.json says the extraction is incomplete .*\['1'\]"):
        list_shards(cfg.output, "32")  # training refuses it by default
    listed = list_shards(cfg.output, "32", allow_incomplete=True)
    assert listed.urls == [os.path.join(cfg.output, "32", f"{i:06d}.tar") for i in (0, 2)]
