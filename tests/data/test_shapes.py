"""The embedded shapes dataset: specs, layout, determinism, shards (local + S3), bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import fsspec
import numpy as np
import pytest
import webdataset as wds

from bdt import cli
from bdt.data import shapes, shards
from bdt.data.shapes import ShapesConfig, make_sample, parse_size

BDT_SCRIPT = os.path.join(os.path.dirname(sys.executable), "bdt")


def test_parse_size():
    assert parse_size("256") == (256, 256)
    assert parse_size("384x256") == (384, 256)
    assert parse_size("64X1024") == (64, 1024)
    for bad in ("abc", "12", "64x", "5000", "64x64x64", "-64"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_sample_is_a_pure_function_of_seed_and_index():
    sizes = [(64, 64), (200, 120)]
    a, b = make_sample(3, 17, sizes), make_sample(3, 17, sizes)
    assert a[0].tobytes() == b[0].tobytes() and a[1:] == b[1:]
    other = make_sample(4, 17, sizes)
    assert other[0].tobytes() != a[0].tobytes() or other[1] != a[1]


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (1024, 64), (64, 1024), (300, 200)])
def test_layout_fits_any_size_without_overlap(size):
    w, h = size
    rng = np.random.default_rng(0)
    for _ in range(15):
        spec = {"category": "counting", "groups": [{"shape": "star", "color": None, "count": 4}],
                "relation": None}
        objs = shapes.layout(rng, spec, w, h)
        assert len(objs) == 4
        for i, o in enumerate(objs):
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert max(x1 - x0, y1 - y0) >= min(12, 0.3 * min(w, h))  # readable size
            for p in objs[:i]:
                px0, py0, px1, py1 = p["bbox"]
                assert x1 <= px0 or px1 <= x0 or y1 <= py0 or py1 <= y0, "objects overlap"


def test_captions_and_layout_follow_the_spec():
    sizes = [(128, 128), (192, 96)]
    seen = set()
    for index in range(120):
        image, text, meta = make_sample(0, index, sizes)
        spec = meta["spec"]
        seen.add(spec["category"])
        assert image.size == (meta["width"], meta["height"]) and text == meta["caption"]
        expected = sorted((g["shape"], g["color"])
                          for g in spec["groups"] for _ in range(g["count"]))
        drawn = sorted((o["shape"], spec["groups"][o["group"]]["color"]) for o in meta["objects"])
        assert drawn == expected
        for g in spec["groups"]:
            assert (g["shape"] if g["count"] == 1 else shapes.PLURALS[g["shape"]]) in text
            if g["color"]:
                assert g["color"] in text
            if g["count"] > 1:
                assert shapes.NUMBER_WORDS[g["count"]] in text
        for o in meta["objects"]:  # the spec's colours are the drawn ones
            want = spec["groups"][o["group"]]["color"]
            assert want is None or o["color"] == want
        if spec["relation"]:
            a, b = (meta["objects"][spec["relation"][k]]["center"] for k in ("a", "b"))
            assert shapes.relation_holds(spec["relation"]["type"], a, b, shapes.DOMINANCE)
    assert seen == set(shapes.CATEGORIES)


def _read_local(out: str, ext: str) -> list[dict]:
    urls = sorted(os.path.join(out, n) for n in os.listdir(out) if n.endswith(".tar"))
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple(
        "__key__", ext, "txt", "json"))


@pytest.mark.slow
def test_local_shards_round_trip_and_are_byte_identical(tmp_path):
    cfg = ShapesConfig(out=str(tmp_path / "a"), num=12, sizes=["64", "96x64"], per_shard=5, seed=7)
    manifest = shards.generate(cfg)
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 2]
    rows = _read_local(cfg.out, "jpg")
    assert [r[0] for r in rows] == [f"{i:09d}" for i in range(12)]
    for key, image, text, meta in rows:
        assert image.size in ((64, 64), (96, 64)) and image.size == (meta["width"], meta["height"])
        assert text == meta["caption"] and meta["index"] == int(key) and meta["seed"] == 7
    names = sorted(os.listdir(cfg.out))
    assert names == ["config.yaml", "manifest.json"] + [f"shapes-00000{i}.tar" for i in range(3)]
    saved = json.load(open(tmp_path / "a" / "manifest.json"))
    assert saved["num_samples"] == 12
    assert saved["shards"][1]["sha256"] == hashlib.sha256(
        (tmp_path / "a" / "shapes-000001.tar").read_bytes()).hexdigest()

    # Same seed, written by 2 worker processes: the same bytes. Another seed: different.
    same = ShapesConfig(**{**vars(cfg), "out": str(tmp_path / "b"), "workers": 2})
    other = ShapesConfig(**{**vars(cfg), "out": str(tmp_path / "c"), "seed": 8})
    shards.generate(same)
    shards.generate(other)
    for name in names[2:]:
        data = (tmp_path / "a" / name).read_bytes()
        assert data == (tmp_path / "b" / name).read_bytes()
        assert data != (tmp_path / "c" / name).read_bytes()


def test_a_rerun_leaves_no_shard_of_the_earlier_one_and_an_empty_out_is_refused(tmp_path):
    """A rerun of fewer shards once left the earlier run's last ones beside its own: the
    documented shapes-*.tar glob read both. --out '' once wrote into the filesystem's root."""
    out = str(tmp_path / "d")
    shards.generate(ShapesConfig(out=out, num=6, sizes=["32"], per_shard=2))
    shards.generate(ShapesConfig(out=out, num=6, sizes=["32"], per_shard=3, seed=1))
    assert sorted(p for p in os.listdir(out) if p.endswith(".tar")) == [
        "shapes-000000.tar", "shapes-000001.tar"]
    with pytest.raises(ValueError, match="--out is empty"):
        shards.generate(ShapesConfig(out="", num=2, sizes=["32"]))


def test_png_format(tmp_path):
    cfg = ShapesConfig(out=str(tmp_path), num=3, sizes=["48x80"], format="png")
    shards.generate(cfg)
    rows = _read_local(str(tmp_path), "png")
    direct = make_sample(cfg.seed, 2, [(48, 80)])[0]
    assert np.array_equal(np.asarray(rows[2][1].convert("RGB")), np.asarray(direct))  # lossless


@pytest.mark.slow
def test_s3_shards_round_trip(s3_bucket, tmp_path, monkeypatch):
    out = s3_bucket + "/shapes"
    cfg = ShapesConfig(out=out, num=6, sizes=["64"], per_shard=4, seed=1)
    shards.generate(cfg)
    fs = fsspec.filesystem("s3")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(out[len("s3://"):]))
    assert names == ["config.yaml", "manifest.json", "shapes-000000.tar", "shapes-000001.tar"]
    # webdataset 1.0.2 has no s3:// opener: give it one backed by fsspec.
    gopen = sys.modules["webdataset.gopen"]
    monkeypatch.setitem(gopen.gopen_schemes, "s3",
                        lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(url, mode).open())
    urls = [f"{out}/shapes-00000{i}.tar" for i in range(2)]
    rows = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "json"))
    assert [r[1]["index"] for r in rows] == list(range(6))
    # Byte-identical to the same dataset written locally.
    local = ShapesConfig(**{**vars(cfg), "out": str(tmp_path)})
    shards.generate(local)
    for i, url in enumerate(urls):
        assert fs.cat(url) == (tmp_path / f"shapes-00000{i}.tar").read_bytes()


@pytest.mark.parametrize("argv, message", [
    (["--num", "5", "--size", "12x64"], "size '12x64'"),
    (["--num", "5", "--size", "big"], "size 'big'"),
    (["--num", "0"], "--num must be a positive"),
    (["--num", "5", "--per-shard", "0"], "--per-shard must be positive"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert cli.main(["data", "shapes", "--out", str(out)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("bdt data: error:")
    assert not out.exists()


def test_unwritable_destination_fails_before_rendering(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file where a directory should be")
    rendered = []
    monkeypatch.setattr(shards, "encode_sample", lambda *a: rendered.append(a))
    assert cli.main(["data", "shapes", "--out", str(blocker / "ds"), "--num", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write to {blocker / 'ds'}" in err
    assert rendered == [] and sorted(os.listdir(tmp_path)) == ["file"]


def test_failure_midway_leaves_no_partial_shard_and_no_manifest(tmp_path, capsys, monkeypatch):
    # A finished dataset is there first: a failed rewrite must not leave it looking complete.
    shards.generate(ShapesConfig(out=str(tmp_path), num=2, sizes=["64"], seed=5))
    assert (tmp_path / "manifest.json").exists()
    real = shards.encode_sample

    def failing(cfg, index, sizes):
        if index == 6:
            raise OSError("No space left on device")
        return real(cfg, index, sizes)

    monkeypatch.setattr(shards, "encode_sample", failing)
    argv = ["data", "shapes", "--out", str(tmp_path), "--num", "9", "--per-shard", "4"]
    assert cli.main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    # Shard 0 is complete; shard 1 (which failed) left nothing, not even its temp file.
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "shapes-000000.tar"]
    assert len(_read_local(str(tmp_path), "jpg")) == 4  # the new shard 0, whole


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(BDT_SCRIPT), reason="bdt console script not installed")
def test_console_script_reports_bad_size(tmp_path):
    proc = subprocess.run([BDT_SCRIPT, "data", "shapes", "--out", str(tmp_path / "o"),
                           "--num", "3", "--size", "64x9999"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "bdt data: error: size '64x9999': width and height must be in [32, 4096] px"]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_workers_exit_when_the_generator_is_killed(tmp_path):
    """SIGKILL (or a default-handled SIGTERM) of `bdt data shapes --workers 2` left its pool's
    processes waiting for tasks forever."""
    import signal
    import time

    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "bdt.cli", "data", "shapes", "--out",
                             str(tmp_path / "out"), "--num", "4000", "--per-shard", "100",
                             "--size", "32", "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list((tmp_path / "out").glob("*.tar")) and time.monotonic() < deadline:
            time.sleep(0.2)  # the pool at work: its workers have taken tasks
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=20)
    for p in alive:
        p.kill()
    assert not alive, [p.pid for p in alive]
