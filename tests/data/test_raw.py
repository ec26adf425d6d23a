"""Raw image-caption shard reader: patterns, decoding, corrupt samples, rank/worker split, resume, s3."""

import io
import itertools
import os
import re

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from bdt import storage
from bdt.data.raw import RawDataConfig, RawImageStream, StreamState, decode_image, expand_shards, make_loader
from testkit import pauses_that


def _img(w, h, fmt, value):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _write_shards(root, num_shards=4, per_shard=5):
    """Shards of valid samples (mixed formats and sizes), plus one corrupt and one image-less."""
    urls = []
    for s in range(num_shards):
        url = storage.join(root, f"raw-{s:03d}.tar")
        with storage.open_atomic(url) as f:
            writer = wds.TarWriter(f)
            for i in range(per_shard):
                key = f"{s:03d}_{i:03d}"
                fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
                writer.write({"__key__": key, ext: _img(40 + 8 * i, 32, fmt, 10 * i + s),
                              "txt": f"caption {key}".encode(), "json": b"{}"})
            if s == 0:
                writer.write({"__key__": "bad_jpeg", "jpg": b"\xff\xd8 not a jpeg", "txt": b"x"})
                writer.write({"__key__": "no_image", "txt": b"caption only"})
            writer.close()
        urls.append(url)
    return urls


def test_expand_patterns_and_missing(tmp_path):
    _write_shards(str(tmp_path))
    brace = expand_shards(str(tmp_path / "raw-{000..003}.tar"))
    assert brace == sorted(expand_shards(str(tmp_path / "raw-*.tar")))
    assert len(brace) == 4
    assert expand_shards(f"{brace[0]},{brace[2]}") == [brace[0], brace[2]]
    with pytest.raises(ValueError, match=r"data.shards: 1 shard\(s\) do not exist.*raw-004.tar"):
        expand_shards(str(tmp_path / "raw-{000..004}.tar"))
    with pytest.raises(ValueError, match=r"data.shards: '.*nothing-\*.tar' matches nothing"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    # One mistyped item of a list is no smaller data set: refused by name (it was dropped).
    with pytest.raises(ValueError, match=r"data.shards: '.*typo/\*.tar' matches nothing \(an item"):
        expand_shards(f"{tmp_path}/raw-*.tar,{tmp_path}/typo/*.tar")
    # A folder names its tars, as the AR stages' and the extraction's inputs do.
    assert expand_shards(str(tmp_path)) == brace
    assert expand_shards(f"{brace[1]},{tmp_path}/") == [brace[1], brace[0], brace[2], brace[3]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder .*empty' holds no .tar file"):
        expand_shards(str(tmp_path / "empty"))


def test_decode_resize_crop_range():
    x = decode_image(_img(64, 32, "PNG", 255), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))
    assert decode_image(_img(32, 32, "PNG", 0), 16).min().item() == -1.0
    # Random crops of a resized image: inside the image, different positions for different draws.
    ramp = io.BytesIO()
    Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3))).save(ramp, "PNG")
    crops = [decode_image(ramp.getvalue(), 8, resize=32, rng=np.random.default_rng(i)) for i in range(6)]
    assert all(c.shape == (3, 8, 8) for c in crops)
    assert len({round(c[0, 0, 0].item(), 4) for c in crops}) > 1
    centre = decode_image(ramp.getvalue(), 8, resize=32)
    assert centre[0, 0, 0].item() == pytest.approx(12 * 8 / 127.5 - 1)


def _keys(stream, batches):
    out = []
    for batch in itertools.islice(iter(stream), batches):
        out += batch["keys"]
    return out


def test_rank_split_corrupt_counted_and_resume(tmp_path):
    urls = _write_shards(str(tmp_path))
    valid = {f"{s:03d}_{i:03d}" for s in range(4) for i in range(5)}
    # One epoch: 2 ranks x 2 shards x 5 valid samples = 5 batches of 2 per rank.
    per_rank = [_keys(RawImageStream(urls, 16, 2, rank, 2, seed=1), 5) for rank in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == valid
    # Rank 0 or 1 owns shard 0 with its two bad samples: counted, not yielded.
    corrupt = [list(itertools.islice(iter(RawImageStream(urls, 16, 2, r, 2, seed=1)), 5))[-1]["corrupt"]
               for r in range(2)]
    assert sorted(corrupt) == [0, 2]
    # Resume: the position after batch 3 continues exactly where the stream would have.
    stream = iter(RawImageStream(urls, 16, 2, 0, 2, seed=1))
    state = StreamState()
    for _ in range(3):
        state.update(next(stream))
    expected = [k for _ in range(4) for k in next(stream)["keys"]]  # crosses into epoch 2
    resumed = RawImageStream(urls, 16, 2, 0, 2, seed=1, positions={0: state.positions[0]})
    assert _keys(resumed, 4) == expected


def test_fewer_shards_than_workers_split_by_sample(tmp_path):
    urls = _write_shards(str(tmp_path), num_shards=1, per_shard=6)
    keys = [_keys(RawImageStream(urls, 16, 3, r, 2), 1) for r in range(2)]
    assert keys == [["000_000", "000_002", "000_004"], ["000_001", "000_003", "000_005"]]


@pytest.mark.slow
def test_a_sigterm_to_the_process_group_leaves_the_workers_serving(tmp_path):
    """SLURM and Kubernetes signal every process of the job: a worker that died of it crashed
    the tokenizer trainer mid-save, where the trainer itself stops at a step boundary."""
    import os
    import signal

    urls = _write_shards(str(tmp_path), num_shards=2, per_shard=4)
    loader, _ = make_loader(RawDataConfig(shards=",".join(urls), size=16, num_workers=1),
                            batch_size=2, rank=0, world_size=1)
    batches = iter(loader)
    next(batches)
    workers = [w.pid for w in batches._workers]
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    assert [b["images"].shape for b in itertools.islice(batches, 6)] == [(2, 3, 16, 16)] * 6
    del batches


@pytest.mark.slow
def test_s3_shards_with_dataloader_workers(s3_bucket):
    _write_shards(storage.join(s3_bucket, "raw"), num_shards=4, per_shard=4)
    cfg = RawDataConfig(shards=storage.join(s3_bucket, "raw", "raw-*.tar"), size=16, num_workers=2)
    loader, state = make_loader(cfg, batch_size=2, rank=0, world_size=1)
    seen = []
    for batch in itertools.islice(loader, 8):  # one epoch: 16 valid samples
        state.update(batch)
        seen += batch["keys"]
        assert batch["images"].shape == (2, 3, 16, 16)
    assert sorted(seen) == sorted(f"{s:03d}_{i:03d}" for s in range(4) for i in range(4))
    assert state.corrupt == 2 and set(state.to_dict()) == {"0", "1"}
    with pytest.raises(ValueError, match="data.num_workers"):
        make_loader(RawDataConfig(shards=cfg.shards, num_workers=3), 2, 0, 1, state.to_dict())


def test_a_damaged_shard_is_skipped_and_no_usable_image_is_an_error(tmp_path):
    """A truncated or empty shard once stopped the stream with TarDamaged; a dataset of nothing
    usable must say so instead of reading on forever."""
    urls = _write_shards(str(tmp_path), num_shards=2, per_shard=4)
    data = open(urls[1], "rb").read()
    with open(urls[1], "wb") as f:
        f.write(data[: len(data) // 2 + 100])  # cut inside a member
    empty = str(tmp_path / "empty.tar")
    open(empty, "wb").close()
    batches = list(itertools.islice(iter(RawImageStream(urls + [empty], 16, 2, 0, 1)), 6))
    assert {"000_000", "000_003"} <= {k for b in batches for k in b["keys"]}
    assert batches[-1]["corrupt"] >= 4  # 2 bad samples + the cut tail + the empty file, per epoch
    with pytest.raises(ValueError, match="gave no usable image"):
        next(iter(RawImageStream([empty], 16, 2, 0, 1)))


def test_a_changed_shard_list_is_refused_on_resume(tmp_path):
    """A saved position is a shard index into one list: over a grown list a resume once read
    some shards twice and others never, silently."""
    urls = _write_shards(str(tmp_path), num_shards=4, per_shard=4)
    stream = RawImageStream(urls[:3], 16, 2, 0, 1)
    batch = next(iter(stream))
    with pytest.raises(ValueError, match="data.shards now names 4 shard"):
        RawImageStream(urls, 16, 2, 0, 1, positions={0: batch["position"]})
    RawImageStream(urls[:3], 16, 2, 0, 1, positions={0: batch["position"]})  # the same: resumes


def test_a_resume_names_its_shards_by_the_files_not_the_names(tmp_path, monkeypatch):
    """Saved over absolute names, resumed from another directory over relative ones of the same
    files: the same list. The same relative names from a directory holding other shards: not."""
    urls = _write_shards(str(tmp_path / "one" / "d"), num_shards=2, per_shard=4)
    _write_shards(str(tmp_path / "two" / "d"), num_shards=2, per_shard=4)
    position = next(iter(RawImageStream(urls, 16, 2, 0, 1)))["position"]
    relative = [os.path.join("d", os.path.basename(u)) for u in urls]
    monkeypatch.chdir(tmp_path / "one")
    RawImageStream(relative, 16, 2, 0, 1, positions={0: position})
    monkeypatch.chdir(tmp_path / "two")
    with pytest.raises(ValueError, match="data.shards now names 2 shard"):
        RawImageStream(relative, 16, 2, 0, 1, positions={0: position})


def test_every_worker_is_fed_by_small_and_bad_shards(tmp_path, caplog):
    """With fewer shards than workers the split counted samples per shard (j % G), so shards of
    fewer than G samples starved a worker, which then stopped the run; with enough shards a
    worker whose shard was all corrupt stopped it too. Rejected samples are logged by key."""
    small = [storage.join(str(tmp_path), f"s{k}.tar") for k in range(2)]
    for k, url in enumerate(small):
        with storage.open_atomic(url) as f, wds.TarWriter(f) as w:
            for i in range(2):
                w.write({"__key__": f"s{k}_{i}", "png": _img(16, 16, "PNG", 40 * i + k), "txt": b"c"})
    got = [next(iter(RawImageStream(small, 16, 1, r, 3)))["keys"] for r in range(3)]
    assert sorted(k for keys in got for k in keys) == ["s0_0", "s0_1", "s1_0"]
    good = _write_shards(str(tmp_path / "good"), num_shards=3, per_shard=2)
    bad = str(tmp_path / "bad.tar")
    with storage.open_atomic(bad) as f, wds.TarWriter(f) as w:
        for i in range(2):
            w.write({"__key__": f"bad_{i}", "jpg": b"\xff\xd8 not a jpeg", "txt": b"c"})
    for rank in range(4):  # one of them holds only bad.tar in some epoch
        assert len(next(iter(RawImageStream(good + [bad], 16, 2, rank, 4)))["keys"]) == 2
    assert "skipping sample 'bad_0' of" in caplog.text and "corrupt_image" in caplog.text
    with pytest.raises(ValueError, match="gave no usable image"):  # nothing usable at all
        next(iter(RawImageStream([bad], 16, 2, 0, 1)))


def test_shards_missing_for_a_moment_are_read_again_not_skipped(tmp_path, monkeypatch, caplog):
    """Before: a shard that failed to open (here: gone for a moment; an NFS EIO, a timeout) was
    skipped for the epoch as if damaged, so the run differed from its exact resume."""
    import os

    urls = _write_shards(str(tmp_path), num_shards=3, per_shard=5)
    want = list(itertools.islice(iter(RawImageStream(urls, 16, 2, 0, 1, seed=1)), 10))
    stream = iter(RawImageStream(urls, 16, 2, 0, 1, seed=1))
    got = [next(stream)]  # its first shard is open now, and stays readable
    for url in urls:
        os.rename(url, url + ".away")
    pauses = pauses_that(monkeypatch, lambda: [os.rename(u + ".away", u) for u in urls])
    with caplog.at_level("WARNING", "bdt.data.raw"):
        got += list(itertools.islice(stream, 9))  # two epochs
    assert [(b["keys"], b["position"]) for b in got] == [(b["keys"], b["position"]) for b in want]
    assert pauses == [1.0] and "reading from sample 0 failed (FileNotFoundError: " in caplog.text


def test_a_shard_that_stays_unreadable_stops_the_stream_naming_it(tmp_path, monkeypatch):
    """Before: skipped as damaged in every epoch, the data silently shrinking."""
    import os

    urls = _write_shards(str(tmp_path), num_shards=2, per_shard=4)
    os.remove(urls[1])
    pauses = pauses_that(monkeypatch)
    with pytest.raises(OSError, match=f"{urls[1]}: reading from sample 0 failed 5 times in a row"):
        list(itertools.islice(iter(RawImageStream(urls, 16, 2, 0, 1)), 8))
    assert pauses == [1.0, 2.0, 4.0, 8.0]


@pytest.mark.slow
def test_an_s3_shard_failing_mid_read_is_read_again_from_its_sample(s3_bucket, monkeypatch,
                                                                     caplog):
    """A real fault on a real S3 API: the object goes missing mid-shard (404 on the next range
    request, a FileNotFoundError from s3fs) and comes back. Before: the rest of the shard was
    skipped as damage; now the stream reads on from the sample it was at, as without a fault."""
    import fsspec.config

    urls = _write_shards(storage.join(s3_bucket, "flaky"), num_shards=1, per_shard=20)
    monkeypatch.setitem(fsspec.config.conf["s3"], "default_block_size", 4096)  # many requests
    fs, key = storage.filesystem(urls[0])
    data = fs.cat_file(key)
    want = list(itertools.islice(iter(RawImageStream(urls, 16, 2, 0, 1)), 12))
    pauses = pauses_that(monkeypatch, lambda: fs.pipe_file(key, data))
    stream = iter(RawImageStream(urls, 16, 2, 0, 1))
    got = [next(stream)]
    fs.rm(key)
    with caplog.at_level("WARNING", "bdt.data.raw"):
        got += list(itertools.islice(stream, 11))  # into the second epoch
    assert [(b["keys"], b["position"]) for b in got] == [(b["keys"], b["position"]) for b in want]
    assert pauses == [1.0] and re.search(r"reading from sample [1-9]\d* failed", caplog.text)


@pytest.mark.slow
def test_a_workers_error_is_its_own_line_and_the_workers_are_gone(tmp_path, monkeypatch):
    """A shard gone for good: the DataLoader raised the worker's OSError with the worker's
    traceback in its message (the trainer's "one-line" failure was a traceback), and the worker
    stayed alive (it ignores SIGTERM): the trainer's exit then joined it forever."""
    urls = _write_shards(str(tmp_path), num_shards=2, per_shard=4)
    pauses_that(monkeypatch)  # the workers, forked from here, do not sleep
    loader, state = make_loader(RawDataConfig(shards=",".join(urls), size=16, num_workers=1),
                                batch_size=2, rank=0, world_size=1)
    os.remove(urls[1])
    batches = iter(loader)
    with pytest.raises(OSError) as raised:
        for _ in range(8):
            state.take(batches)
    assert re.fullmatch(rf"{urls[1]}: reading from sample 0 failed 5 times in a row, last: "
                        rf"FileNotFoundError: .*", str(raised.value)), str(raised.value)
    for worker in batches._workers:
        worker.join(10)
        assert not worker.is_alive()


@pytest.mark.slow
def test_a_stalled_read_stops_with_its_own_error_and_no_worker_check_left(tmp_path, monkeypatch):
    """data.stall_s: the stuck worker is killed, and the DataLoader's SIGCHLD check of it goes
    first: left in place, the killed worker raised "DataLoader worker (pid N) is killed by
    signal" wherever this process was, once inside the formatting of the TimeoutError's
    traceback, which then never reached the log (a tokenizer-trainer test failed on it)."""
    import time

    from torch.utils.data._utils import signal_handling

    from bdt.data import raw

    urls = _write_shards(str(tmp_path), num_shards=1, per_shard=4)

    def read_forever(*args, **kwargs):  # a hung mount, in the workers forked from here
        while True:
            time.sleep(1)

    monkeypatch.setattr(raw, "read_samples", read_forever)
    loader, state = make_loader(RawDataConfig(shards=urls[0], size=16, num_workers=1, stall_s=1),
                                batch_size=2, rank=0, world_size=1)
    batches = iter(loader)
    with pytest.raises(TimeoutError, match="no batch from the data workers"):
        state.take(batches)
    for worker in batches._workers:
        worker.join(10)
        assert not worker.is_alive()
    signal_handling._error_if_any_worker_fails()  # raised for the killed worker before
