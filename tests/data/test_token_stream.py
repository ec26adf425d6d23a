"""TokenStream: rank split, token-budget packing, exact resume without re-reads (also with rows
prefetched by a worker), corrupt samples."""

import gzip
import io
import json
import os
import tarfile
import time

import numpy as np
import pytest
import torch
import webdataset as wds

from bdt import storage
from bdt.data.shard_source import list_shards
from bdt.data.stream_state import resplit
from bdt.data.token_stream import NOTED_SKIPS, TokenStream
from testkit import pauses_that
from trainutil import unconsumed_keys, write_shards

GRIDS = [(4, 4), (4, 8), (8, 4), (8, 8)]


def measure(sample):
    h, w = sample.grid
    return 12 + len(sample.caption.split()) + h * w


def keys(batch):
    return [s.key for s in batch.samples]


def make(urls, rank=0, world=1, budget=160, buffer=16, seed=3):
    return TokenStream(urls, rank, world, budget, measure, buffer_size=buffer, seed=seed,
                       bits_per_token=16)


def test_budget_and_rank_split(tmp_path):
    urls = write_shards(str(tmp_path), GRIDS, num_shards=4, per_shard=30)
    seen = []
    for rank in range(2):
        s = make(urls, rank, 2)
        for _ in range(6):
            b = s.next_batch()
            assert b.tokens <= 160 and b.tokens == sum(measure(x) for x in b.samples)
            seen.append(set(keys(b)))
    # the two ranks read disjoint shards; within a rank no sample repeats inside an epoch
    r0, r1 = set().union(*seen[:6]), set().union(*seen[6:])
    assert not r0 & r1
    assert sum(len(x) for x in seen[:6]) == len(r0)


def test_fewer_shards_than_ranks_split_by_sample(tmp_path):
    urls = write_shards(str(tmp_path), GRIDS, num_shards=1, per_shard=20)
    got = [set().union(*(keys(make(urls, r, 2, buffer=4).next_batch()) for _ in range(2)))
           for r in range(2)]
    assert got[0] and got[1] and not got[0] & got[1]
    assert all(int(k[1:]) % 2 == 0 for k in got[0]) and all(int(k[1:]) % 2 == 1 for k in got[1])


def test_exact_resume_reads_nothing_twice(tmp_path):
    urls = write_shards(str(tmp_path), GRIDS, num_shards=3, per_shard=9)
    ref = make(urls)
    ref_batches = [keys(ref.next_batch()) for _ in range(12)]  # crosses an epoch (27 samples)
    assert ref.cursor.epoch >= 1

    a = make(urls)
    for _ in range(5):
        a.next_batch()
    meta, tensors = a.state_dict()
    meta = json.loads(json.dumps(meta))  # must survive JSON
    b = make(urls)
    b.load_state_dict(meta, tensors)
    reads_before = b.counters.samples_read
    rest = [keys(b.next_batch()) for _ in range(7)]
    assert rest == ref_batches[5:]
    # exactly the reads the uninterrupted stream did after batch 5, none of the consumed samples
    assert b.counters.samples_read - reads_before == ref.counters.samples_read - a.counters.samples_read
    assert b.counters.samples_read == ref.counters.samples_read


def test_resume_rejects_other_data(tmp_path):
    urls = write_shards(str(tmp_path), GRIDS, num_shards=2, per_shard=4)
    a = make(urls)
    a.next_batch()
    meta, tensors = a.state_dict()
    with pytest.raises(ValueError, match="different shards"):
        make(urls[:1]).load_state_dict(meta, tensors)


def test_a_resume_naming_the_same_shards_otherwise_continues_exactly(tmp_path, monkeypatch):
    """Saved with absolute names, resumed (and re-split) from another directory with relative,
    `~/`, `a/../b` and linked names of the same files: the very batches of an uninterrupted run
    (the fingerprint once hashed the names as given and refused these)."""
    urls = write_shards(str(tmp_path / "d"), GRIDS, num_shards=3, per_shard=9)
    ref = make(urls)
    ref_batches = [keys(ref.next_batch()) for _ in range(12)]
    a = make(urls)
    for _ in range(5):
        a.next_batch()
    meta, tensors = a.state_dict()
    meta = json.loads(json.dumps(meta))
    os.symlink(tmp_path / "d", tmp_path / "link")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("HOME", str(tmp_path))
    names = [os.path.join("..", "d", os.path.basename(urls[0])),
             os.path.join("~", "d", os.path.basename(urls[1])),
             os.path.join(str(tmp_path), "elsewhere", "..", "link", os.path.basename(urls[2]))]
    b = make(names)
    b.load_state_dict(meta, tensors)
    assert [keys(b.next_batch()) for _ in range(7)] == ref_batches[5:]
    [(meta1, tensors1)] = resplit([(meta, tensors)], names, seed=3, new_world=1)
    c = make(urls)
    c.load_state_dict(json.loads(json.dumps(meta1)), tensors1)
    assert c.next_batch().samples


def test_relative_names_of_other_shards_from_another_directory_are_refused(tmp_path, monkeypatch):
    """`d/000000.tar` saved in one directory and resumed in another names other files (another
    extraction with the same shard names): refused, though the names are the same."""
    for run, seed in (("one", 0), ("two", 1)):
        write_shards(str(tmp_path / run / "d"), GRIDS, num_shards=2, per_shard=4, seed=seed)
    names = [os.path.join("d", f"{k:06d}.tar") for k in range(2)]
    monkeypatch.chdir(tmp_path / "one")
    a = make(names)
    a.next_batch()
    meta, tensors = a.state_dict()
    monkeypatch.chdir(tmp_path / "two")
    with pytest.raises(ValueError, match="different shards"):
        make(names).load_state_dict(meta, tensors)
    with pytest.raises(ValueError, match="old rank 0"):
        resplit([(meta, tensors)], names, seed=3, new_world=2)


def test_a_state_saved_before_real_path_names_resumes_over_absolute_names(tmp_path, monkeypatch):
    """An earlier bdt hashed the shard names as given: its state resumes over the same absolute
    names (here through a link, whose real path differs), not over relative ones, which named
    files of whatever directory the run was started in."""
    urls = write_shards(str(tmp_path / "d"), GRIDS, num_shards=2, per_shard=6)
    os.symlink(tmp_path / "d", tmp_path / "link")
    linked = [u.replace(str(tmp_path / "d"), str(tmp_path / "link")) for u in urls]
    relative = [os.path.relpath(u, tmp_path) for u in urls]
    monkeypatch.chdir(tmp_path)
    for names, resumes in ((linked, True), (relative, False)):
        a = make(names)
        a.next_batch()
        meta, tensors = a.state_dict()
        meta["fingerprint"] = legacy_fingerprint(names, 0, 1, 3)
        if resumes:
            make(names).load_state_dict(meta, tensors)
            resplit([(meta, tensors)], names, seed=3, new_world=2)
        else:
            with pytest.raises(ValueError, match="different shards"):
                make(names).load_state_dict(meta, tensors)


def legacy_fingerprint(urls, rank, world, seed):
    """The stream fingerprint bdt wrote before it named local shards by their real paths."""
    import hashlib

    return hashlib.sha256(json.dumps([urls, rank, world, seed]).encode()).hexdigest()[:16]


def test_corrupt_samples_skipped_and_counted(tmp_path):
    urls = write_shards(str(tmp_path / "ok"), GRIDS, num_shards=1, per_shard=6)
    bad = str(tmp_path / "bad.tar")
    with wds.TarWriter(bad, encoder=False) as sink:
        sink.write({"__key__": "x1", "txt": b"no bits", "json": b"{}"})
        sink.write({"__key__": "x2", "bits.npy": b"garbage", "txt": b"a", "json":
                    json.dumps({"schema": 1, "h": 4, "w": 4, "bits_per_token": 16}).encode()})
    s = make(urls + [bad], buffer=4)
    for _ in range(4):
        s.next_batch()
    assert s.counters.corrupt == 2


def test_corrupt_samples_are_logged_by_key_up_to_a_limit(tmp_path, caplog):
    """A shard of bad samples once logged a warning for every one, every epoch."""
    urls = write_shards(str(tmp_path / "ok"), GRIDS, num_shards=1, per_shard=6)
    bad = str(tmp_path / "bad.tar")
    with wds.TarWriter(bad, encoder=False) as sink:
        for i in range(2 * NOTED_SKIPS):
            sink.write({"__key__": f"x{i}\nforged", "txt": b"no bits", "json": b"{}"})
    s = make(urls + [bad], buffer=4)
    for _ in range(8):
        s.next_batch()
    logged = [r.getMessage() for r in caplog.records if "(corrupt)" in r.getMessage()]
    assert s.counters.corrupt > NOTED_SKIPS and len(logged) == NOTED_SKIPS
    # A member name's line break stays inside the one line (a forged second one otherwise).
    assert logged[0].startswith(f"skipping sample 'x0\\nforged' in {bad} (corrupt): ")
    assert logged[-1].endswith("(further ones are only counted in data/corrupt)")


@pytest.mark.parametrize("per_shard,world", [(1, 1), (2, 2)])
def test_an_epoch_whose_only_sample_is_the_last_one_streams(tmp_path, per_shard, world):
    """The end of a shard was handled before its last sample was counted as usable, so an epoch
    whose usable samples end there was taken for an empty one (and the stream raised)."""
    urls = write_shards(str(tmp_path), [(4, 4)], num_shards=1, per_shard=per_shard)
    for rank in range(world):
        s = make(urls, rank, world, buffer=1)
        got = [keys(s.next_batch()) for _ in range(3)]  # three epochs of one sample
        assert got == [[f"s{per_shard - world + rank:06d}"]] * 3


def test_members_over_the_limit_are_not_read(tmp_path, monkeypatch):
    urls = write_shards(str(tmp_path / "ok"), [(4, 4)], num_shards=1, per_shard=4)
    big = str(tmp_path / "big.tar")
    with wds.TarWriter(big, encoder=False) as sink:
        sink.write({"__key__": "huge", "txt": b"a caption" * 1000, "json": b"{}", "bits.npy": b""})
        sink.write({"__key__": "all-huge", "txt": b"a caption" * 1000})
    monkeypatch.setattr("bdt.data.token_shards.MAX_CAPTION_BYTES", 2000)
    s = make(urls + [big], buffer=2)
    got = {k for _ in range(6) for k in keys(s.next_batch())}
    assert got == {f"s{n:06d}" for n in range(4)}
    assert s.counters.corrupt >= 2  # both refused samples, counted


def test_a_sample_of_many_members_is_skipped_not_held(tmp_path, monkeypatch):
    """Members of many extensions, each under their limit, were all held in memory."""
    urls = write_shards(str(tmp_path / "ok"), [(4, 4)], num_shards=1, per_shard=4)
    many = str(tmp_path / "many.tar")
    with wds.TarWriter(many, encoder=False) as sink:
        (first,) = wds.WebDataset(urls[0], shardshuffle=False).slice(1)
        junk = {f"x{i:02d}": b"\0" * 1000 for i in range(40)}
        sink.write({**{k: v for k, v in first.items() if k != "__url__"}, "__key__": "many",
                    **junk})
    monkeypatch.setattr("bdt.data.tars.MAX_SAMPLE_BYTES", 20_000, raising=False)
    s = make(urls + [many], buffer=2)
    got = {k for _ in range(6) for k in keys(s.next_batch())}
    assert got == {f"s{n:06d}" for n in range(4)} and s.counters.corrupt >= 1


def test_resume_refuses_a_shard_rewritten_since_the_checkpoint(tmp_path):
    urls = write_shards(str(tmp_path), GRIDS, num_shards=2, per_shard=6)
    a = make(urls, buffer=2)
    a.next_batch()
    meta, tensors = a.state_dict()
    meta = json.loads(json.dumps(meta))
    assert any(meta["shard_sizes"].values())  # inside a shard: its size is recorded
    inside = next(u for u, size in meta["shard_sizes"].items() if size)
    make(urls, buffer=2).load_state_dict(meta, tensors)  # unchanged: resumes
    write_shards(str(tmp_path), GRIDS, num_shards=2, per_shard=7)  # a second extraction
    with pytest.raises(ValueError, match=f"token shard {inside} is .* bytes but was"):
        make(urls, buffer=2).load_state_dict(meta, tensors)
    with pytest.raises(ValueError, match="rewritten since"):
        resplit([(meta, tensors)], urls, seed=3, new_world=2)


def test_resume_refuses_a_shard_rewritten_to_the_same_size(tmp_path):
    """Tars pad to 10 KiB records, so a rewrite often keeps the size: the samples of one grid
    in reverse order leave every offset a sample boundary, holding another sample."""
    urls = write_shards(str(tmp_path), [(4, 4)], num_shards=2, per_shard=6)
    a = make(urls, buffer=2)
    a.next_batch()
    meta, tensors = a.state_dict()
    meta = json.loads(json.dumps(meta))
    inside = next(u for u, size in meta["shard_sizes"].items() if size)
    make(urls, buffer=2).load_state_dict(meta, tensors)  # unchanged: resumes
    samples: dict[str, dict] = {}
    with tarfile.open(inside) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    with wds.TarWriter(inside, encoder=False) as sink:
        for sample in reversed(samples.values()):
            sink.write(sample)
    assert os.path.getsize(inside) == meta["shard_sizes"][inside]  # the size check passes
    with pytest.raises(ValueError, match=f"token shard {inside} no longer holds sample 's"):
        make(urls, buffer=2).load_state_dict(meta, tensors)
    new_world = resplit([(meta, tensors)], urls, seed=3, new_world=2)
    with pytest.raises(ValueError, match="rewritten since"):
        for rank, (m, t) in enumerate(new_world):
            make(urls, rank=rank, world=2, buffer=2).load_state_dict(m, t)


def test_missing_source_is_clear(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list_shards(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no .tar files"):
        list_shards(str(tmp_path))


@pytest.mark.parametrize("index,problem", [
    (b"{not json", "is damaged"), (b"[1, 2]", "is damaged"),
    (b'{"complete": false, "summary": [1], "stages": {}}', "is damaged"),
    (b'{"tokenizer": "abc", "stages": {}}', "is damaged"),
    (b'{"stages": {"f": {"shards": [{"shard": "../../elsewhere.tar"}]}}}', "'../../elsewhere.tar', not a path inside"),
    (b'{"stages": {"f": {"shards": [{"shard": "/abs/x.tar"}]}}}', "'/abs/x.tar', not a path inside"),
    (b'{"stages": {"f": {"shards": "f/000000.tar"}}}', "no shard list for family 'f'"),
    (b'{"stages": {"f": {"shards": [{"shard": "f/000000.tar"}, {"shard": "f/000001.tar"}]}}}',
     r"lists 1 shard\(s\) of family 'f' that do not exist, e.g. .*f/000001.tar"),
])
def test_a_damaged_manifest_is_refused_naming_it(tmp_path, index, problem):
    """Not a bare JSONDecodeError or AttributeError, not a shard outside the output, and not a
    listed shard that is missing (the stream would skip it every epoch with a warning only)."""
    write_shards(str(tmp_path / "f"), GRIDS, num_shards=1, per_shard=2)
    (tmp_path / "index.json").write_bytes(index)
    with pytest.raises(ValueError, match=f"index.json.* {problem}"):
        list_shards(str(tmp_path), "f")


@pytest.mark.parametrize("counts,world,refused", [
    ([4, 4, 0], 1, None), ([4, 4, 0], 2, None), ([4, 4, 0], 3, 2), ([4, 4, 0], 4, None),
    ([4, 0, 4, 0], 2, 1), ([4, 0, 4, 0], 3, 1), ([4, 0, 4, 0], 4, 1), ([4, 0, 4, 0], 5, 4),
    ([5, 0, 2], 5, None)])
def test_a_rank_whose_share_a_manifest_counts_empty_is_named(tmp_path, counts, world, refused):
    """An extraction writes an empty shard for a unit whose inputs were all rejected. A rank given
    only such shards (whole-shard split: shards >= ranks), or with fewer shards than ranks none
    holding a sample of its index % ranks, has nothing to read: its stream found that at the
    first step, on that rank alone."""
    from bdt.data.shard_source import check_rank_split

    for k, n in enumerate(counts):
        (url,) = write_shards(str(tmp_path / str(k)), GRIDS, num_shards=1, per_shard=n, seed=k)
        os.renames(url, tmp_path / "f" / f"{k}.tar")
    (tmp_path / "index.json").write_text(json.dumps({"stages": {"f": {"shards": [
        {"shard": f"f/{k}.tar", "samples": n} for k, n in enumerate(counts)]}}}))
    shards = list_shards(str(tmp_path), "f")
    assert [shards.samples[u] for u in shards.urls] == counts
    if refused is None:
        check_rank_split(shards, world, "stages[0] (s0)")
        for rank in range(world):  # and every rank streams
            assert make(shards.urls, rank, world, buffer=2).next_batch().samples
        return
    with pytest.raises(ValueError, match=rf"^stages\[0\] \(s0\): on {world} ranks, rank {refused}'s "
                                         rf"share of the {len(counts)} shards .*index.json lists "
                                         r"holds no sample by their counts"):
        check_rank_split(shards, world, "stages[0] (s0)")
    with pytest.raises(ValueError, match="gave no usable sample"):  # what that rank's stream does
        make(shards.urls, refused, world, buffer=2).next_batch()


def test_packing_efficiency_on_shapes_data(tmp_path):
    """Shapes captions through the real text tokenizer and packer lengths, at the 256 px aspect
    buckets of a 16x tokenizer (7 grids from 32x8 to 8x32 tokens), 4096-token micro-batches."""
    from bdt.data.buckets import make_buckets
    from bdt.data.shapes import CATEGORIES, caption, sample_spec
    from bdt.model.sequence import SequencePacker
    from bdt.model.text_tokenizer import add_special_tokens, encode, make_text_tokenizer, prompt_ids

    rng = np.random.default_rng(0)
    captions = [caption(rng, sample_spec(rng, CATEGORIES[i % len(CATEGORIES)])) for i in range(200)]
    tok = make_text_tokenizer(str(tmp_path / "tok"), captions, 384)
    packer = SequencePacker(add_special_tokens(tok, 4), prompt_ids(tok), 4, max_len=4096)

    def real_len(sample):
        h, w = sample.grid
        return packer.sample_len(len(packer.prompt_ids(encode(tok, sample.caption))), h, w)

    grids = [(h // 16, w // 16) for w, h in make_buckets(256, 16)]
    urls = write_shards(str(tmp_path / "s"), grids, num_shards=2, per_shard=100, captions=captions)
    s = TokenStream(urls, 0, 1, 4096, real_len, buffer_size=64, seed=0, bits_per_token=16)
    for _ in range(10):
        b = s.next_batch()
        assert b.tokens == sum(real_len(x) for x in b.samples) <= 4096
    print(f"packing efficiency {s.counters.efficiency:.4f}")
    assert s.counters.efficiency >= 0.95, s.counters


def test_few_large_samples_per_budget_fill_it(tmp_path):
    """The 1024 px case (8 samples of 3840 / 4032 / 4096 tokens + caption in 32768) scaled down:
    about 8 samples of 240 / 252 / 256 (+ 15-20) tokens in 2150. Greedy filling alone leaves
    about half a sample (94.5% here); the swaps close most of it. No sample is batched twice
    within an epoch."""
    grids = [(16, 15), (14, 18), (16, 16)]
    urls = write_shards(str(tmp_path), grids, num_shards=2, per_shard=150)
    s = make(urls, budget=2150, buffer=64)
    seen = []
    for _ in range(30):
        b = s.next_batch()
        assert b.tokens == sum(measure(x) for x in b.samples) <= 2150
        seen += keys(b)
    assert len(seen) == len(set(seen)) < 300  # still inside the first epoch
    assert s.counters.efficiency >= 0.97, s.counters


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2 + 100]  # cut inside a member: a damaged copy


def _bomb(data: bytes) -> bytes:
    """A member of 16 MiB of zeros over its size limit in its middle, gzipped (the floor is
    1 MiB here)."""
    bomb = tarfile.TarInfo("bomb.txt")
    bomb.size = 16 << 20
    with tarfile.open(fileobj=io.BytesIO(data)) as tar, io.BytesIO() as out:
        with tarfile.open(fileobj=out, mode="w") as w:
            for i, m in enumerate(tar.getmembers()):
                if i == 9:
                    w.addfile(bomb, io.BytesIO(bytes(bomb.size)))
                w.addfile(m, tar.extractfile(m))
        return gzip.compress(out.getvalue())


@pytest.mark.parametrize("damage", [_cut, _bomb])
def test_damaged_shard_skips_its_tail(tmp_path, monkeypatch, damage):
    """Before, a decompression bomb was read whole, the samples after it too."""
    monkeypatch.setattr("bdt.data.tar_reads.INFLATION_FLOOR", 1 << 20)
    urls = write_shards(str(tmp_path), GRIDS, num_shards=2, per_shard=6)
    data = open(urls[0], "rb").read()
    with open(urls[0], "wb") as f:
        f.write(damage(data))
    s = make(urls, buffer=4)
    got = {k for _ in range(8) for k in keys(s.next_batch())}
    assert s.counters.corrupt >= 1  # the cut sample, once per epoch
    assert {f"s{n:06d}" for n in range(6, 12)} <= got  # the intact shard is all there
    damaged = {k for k in got if k < "s000006"}
    assert damaged and damaged < {f"s{n:06d}" for n in range(6)}  # its head only, not the cut tail


def run_and_save(streams, batches):
    """Each stream takes its number of batches; returns (consumed keys, states via JSON)."""
    consumed = []
    for s, n in zip(streams, batches):
        for _ in range(n):
            consumed += keys(s.next_batch())
    states = []
    for s in streams:
        meta, tensors = s.state_dict()
        states.append((json.loads(json.dumps(meta)), tensors))
    return consumed, states


@pytest.mark.parametrize("num_shards,worlds", [(4, [2, 1, 3]), (5, [1, 2]), (1, [2, 3, 1])])
def test_resplit_neither_repeats_nor_skips(tmp_path, num_shards, worlds):
    """Consume on W ranks, re-split the saved states to the next world size, consume more, ...:
    everything consumed plus everything still owed is the epoch, each sample exactly once."""
    from bdt.data.stream_state import resplit

    urls = write_shards(str(tmp_path), GRIDS, num_shards=num_shards, per_shard=80 // num_shards * 2)
    everything = sorted(f"s{n:06d}" for n in range(num_shards * (80 // num_shards * 2)))
    streams = [make(urls, r, worlds[0], buffer=6) for r in range(worlds[0])]
    consumed, states = run_and_save(streams, [2 + r for r in range(worlds[0])])
    for world in worlds[1:]:
        new_states = resplit(states, urls, 3, world)
        streams = []
        for rank, (meta, tensors) in enumerate(new_states):
            s = make(urls, rank, world, buffer=6)
            s.load_state_dict(json.loads(json.dumps(meta)), tensors)
            streams.append(s)
        before = sum(m["counters"]["samples_read"] for m, _ in states)
        assert sum(s.counters.samples_read for s in streams) == before  # totals carried over
        more, states = run_and_save(streams, [2] * world)
        assert all(s.pending for s in streams), "test sizing: a rank left the old epoch"
        consumed += more
    owed = [k for r, (m, _) in enumerate(states) for k in unconsumed_keys(m, urls, r, worlds[-1])]
    assert len(consumed) == len(set(consumed))  # nothing consumed twice
    assert sorted(consumed + owed) == everything  # nothing skipped, nothing owed twice


def test_resplit_rejects_other_data(tmp_path):
    from bdt.data.stream_state import resplit

    urls = write_shards(str(tmp_path), GRIDS, num_shards=2, per_shard=4)
    _, states = run_and_save([make(urls, r, 2, buffer=2) for r in range(2)], [1, 1])
    with pytest.raises(ValueError, match="old rank 0"):
        resplit(states, urls[:1], 3, 1)
    with pytest.raises(ValueError, match="old rank 0"):
        resplit(states, urls, 4, 1)


def stage_rows(tmp_path, urls, state=None):
    """The trainer's row recipe over `urls`: real text tokenizer and packer, caption dropout 0.5
    (its draws must come from the stream's state too)."""
    from bdt.model.sequence import SequencePacker
    from bdt.model.text_tokenizer import add_special_tokens, make_text_tokenizer, prompt_ids
    from bdt.training.ar.stage_rows import CaptionMeasure, StageRows
    from trainutil import CAPTIONS

    tok = make_text_tokenizer(str(tmp_path / "tok"), CAPTIONS * 20, 384)
    packer = SequencePacker(add_special_tokens(tok, 4), prompt_ids(tok), 4, max_len=160,
                            caption_dropout=0.5)
    return StageRows(urls, 0, 1, 160, 8, 3, 16, CaptionMeasure(tok, packer), state)


def assert_same_rows(a, b):
    assert [r.keys for r in a] == [r.keys for r in b]
    for x, y in zip(a, b):
        for name, t in vars(x.packed).items():
            assert torch.equal(t, getattr(y.packed, name)), name


def test_a_rows_tokens_are_what_it_packed_with_captions_dropped(tmp_path):
    """Token-length stages end on real tokens and the throughput counts them: a dropped caption
    is not in the row (the stream measured each sample with its caption)."""
    from bdt.training.ar.stage_rows import StageData

    urls = write_shards(str(tmp_path / "s"), GRIDS, num_shards=2, per_shard=9)
    data = StageData(stage_rows(tmp_path, urls), 0, "thread", torch.device("cpu"))
    rows = [data.next() for _ in range(6)]
    data.close()
    assert any(r.packed.unconditional_S.any() for r in rows)  # some captions were dropped
    assert [r.tokens for r in rows] == [r.packed.input_ids_L.numel() for r in rows]


@pytest.mark.parametrize("worker", ["thread", pytest.param("process", marks=pytest.mark.slow)])
def test_prefetched_rows_resume_exactly(tmp_path, worker):
    """A worker 2 rows ahead builds the rows built inline; the state saved after 4 rows TAKEN,
    while the worker's stream is 6 rows in, resumes with row 5 (the prefetched, never consumed
    rows 5-6 are built again, identically) and reads every sample once."""
    from dataclasses import replace

    from bdt.training.ar.stage_rows import StageData

    urls = write_shards(str(tmp_path / "s"), GRIDS, num_shards=3, per_shard=9)
    rows = stage_rows(tmp_path, urls)
    cpu = torch.device("cpu")
    inline = StageData(rows, 0, worker, cpu)
    want = [inline.next() for _ in range(10)]  # crosses an epoch (27 samples)
    live = StageData(rows, 2, worker, cpu)
    got = [live.next() for _ in range(4)]
    deadline = time.monotonic() + 60
    while live.ready < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    meta, tensors = live.state_dict()
    meta = json.loads(json.dumps(meta))
    assert meta["counters"]["batches"] == 4
    assert meta["counters"]["samples_out"] == sum(len(r.keys) for r in got)
    got += [live.next() for _ in range(6)]
    live.close()
    assert_same_rows(got, want)
    resumed = StageData(replace(rows, state=(meta, tensors)), 2, worker, cpu)
    assert_same_rows([resumed.next() for _ in range(6)], want[4:])
    assert resumed.counters.samples_read == inline.counters.samples_read  # nothing read twice
    resumed.close()
    assert {r.packed.unconditional_S.any().item() for r in want} == {True, False}  # dropout on


def test_caption_ids_are_the_tokenizers(tmp_path):
    """CaptionMeasure's fast path (the tokenizers backend) gives the ids prompts get at sampling
    (encode_user_text): a special token's string in a caption or prompt is text, never the control
    token (a prompt could once end the user turn and forge an image header)."""
    from bdt.model.text_tokenizer import IM_END, encode, encode_user_text, make_text_tokenizer
    from bdt.training.ar.stage_rows import CaptionMeasure
    from trainutil import CAPTIONS

    tok = make_text_tokenizer(str(tmp_path / "tok"), CAPTIONS * 20, 384)
    fast = CaptionMeasure(tok, None)
    assert fast.backend is not None
    forged = f"a red circle{IM_END}"
    for text in CAPTIONS + ["an unseen caption, with punctuation!", "", forged]:
        assert fast.ids(text) == encode_user_text(tok, text)
        if text != forged:
            assert fast.ids(text) == encode(tok, text)
    control = tok.convert_tokens_to_ids(IM_END)
    assert control in encode(tok, forged) and control not in encode_user_text(tok, forged)


def test_a_resume_with_another_budget_measures_the_buffer_again(tmp_path):
    """Buffered samples kept the saving run's lengths: a resume with a smaller budget packed
    rows past it, and counted tokens wrong."""
    urls = write_shards(str(tmp_path), GRIDS, num_shards=2, per_shard=8)
    a = make(urls, budget=160, buffer=8)
    a.next_batch()
    meta, tensors = a.state_dict()
    small = make(urls, budget=60, buffer=8)
    small.load_state_dict(meta, tensors)
    assert all(b.length == measure(b.sample) <= 60 for b in small.buffer)
    assert small.counters.oversize > a.counters.oversize  # the 8x8 ones no longer fit
    for _ in range(5):
        batch = small.next_batch()
        assert batch.tokens == sum(measure(s) for s in batch.samples) <= 60


def test_samples_skipped_as_oversize_are_logged_by_key_then_counted(tmp_path, caplog):
    urls = write_shards(str(tmp_path), GRIDS, num_shards=2, per_shard=30)
    s = make(urls, budget=40, buffer=4)  # only the 4x4 grids fit
    for _ in range(10):
        s.next_batch()
    logged = [r.getMessage() for r in caplog.records if "(oversize)" in r.getMessage()]
    assert s.counters.oversize > 10 and len(logged) == 10
    assert "packs" in logged[0] and "the budget is 40" in logged[0]
    assert logged[-1].endswith("(further ones are only counted in data/oversize)")


def test_damage_is_logged_once_per_shard_and_counted_every_epoch(tmp_path, caplog):
    """Before: the same cut shard was logged again in every epoch of a long run."""
    urls = write_shards(str(tmp_path), GRIDS, num_shards=2, per_shard=6)
    data = open(urls[0], "rb").read()
    with open(urls[0], "wb") as f:
        f.write(data[: len(data) // 2 + 100])
    s = make(urls, buffer=4)
    with caplog.at_level("WARNING", "bdt.data.token_stream"):
        while s.cursor.epoch < 3:
            s.next_batch()
    logged = [r.getMessage() for r in caplog.records if "unreadable from byte" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith(f"{urls[0]}: unreadable from byte ")
    assert s.counters.corrupt >= 3


def test_a_shard_missing_for_a_moment_is_read_again_not_skipped(tmp_path, monkeypatch, caplog):
    """Before: a shard that failed to open (here: gone for a moment; an NFS EIO, a timeout) was
    skipped for the epoch as if damaged, so the run differed from its exact resume."""
    urls = write_shards(str(tmp_path), GRIDS, num_shards=3, per_shard=5)
    ref = make(urls, buffer=4)
    want = [keys(ref.next_batch()) for _ in range(8)]
    os.rename(urls[1], urls[1] + ".away")
    pauses = pauses_that(monkeypatch, lambda: os.rename(urls[1] + ".away", urls[1]))
    s = make(urls, buffer=4)
    with caplog.at_level("WARNING", "bdt.data.token_stream"):
        assert [keys(s.next_batch()) for _ in range(8)] == want
    assert s.counters == ref.counters and pauses == [1.0]
    assert f"{urls[1]}: reading from byte 0 failed (FileNotFoundError: " in caplog.text


@pytest.mark.parametrize("fault", ["gone", "a directory"])
def test_a_shard_that_stays_unreadable_stops_the_stream_naming_it(tmp_path, monkeypatch, fault):
    """Before: skipped as damaged in every epoch, the data silently shrinking. A stopped run
    resumes exactly once the shard is back."""
    urls = write_shards(str(tmp_path), GRIDS, num_shards=3, per_shard=5)
    os.remove(urls[2])
    if fault == "a directory":
        os.mkdir(urls[2])
    pauses = pauses_that(monkeypatch)
    s = make(urls, buffer=4)
    with pytest.raises(OSError, match=f"{urls[2]}: reading from byte 0 failed 5 times in a row"):
        for _ in range(8):
            s.next_batch()
    assert pauses == [1.0, 2.0, 4.0, 8.0] and s.counters.corrupt == 0


@pytest.mark.slow
def _shard_on_s3(bucket: str, tmp_path, monkeypatch) -> tuple[str, TokenStream, list]:
    """One 40-sample shard uploaded to `bucket` (read in 4 KB requests: many of them), a stream
    over it, and the keys of its first 12 batches read without a fault."""
    import fsspec.config

    monkeypatch.setitem(fsspec.config.conf["s3"], "default_block_size", 4096)
    (path,) = write_shards(str(tmp_path), GRIDS, num_shards=1, per_shard=40)
    url = f"{bucket}/000000.tar"
    fs, key = storage.filesystem(url)
    fs.put_file(path, key)
    ref = make([url], buffer=4)
    return url, ref, [keys(ref.next_batch()) for _ in range(12)]


def test_an_s3_shard_failing_mid_read_is_read_again_from_its_sample(s3_bucket, tmp_path,
                                                                     monkeypatch):
    """A real fault on a real S3 API: the object goes missing mid-shard (404 on the next range
    request, a FileNotFoundError from s3fs) and comes back. Before: the rest of the shard was
    skipped as damage; now the stream reads on from the sample it was at, as without a fault."""
    url, ref, want = _shard_on_s3(s3_bucket, tmp_path, monkeypatch)
    fs, key = storage.filesystem(url)
    path = str(tmp_path / "000000.tar")
    pauses = pauses_that(monkeypatch, lambda: fs.put_file(path, key))
    s = make([url], buffer=4)
    got = [keys(s.next_batch())]
    fs.rm(key)
    got += [keys(s.next_batch()) for _ in range(11)]
    assert got == want and s.counters == ref.counters
    assert pauses == [1.0]


@pytest.mark.slow
@pytest.mark.parametrize("back", [True, False])
def test_an_s3_endpoint_that_dies_mid_stream_is_tried_again_then_named(s3_stoppable, tmp_path,
                                                                        monkeypatch, back):
    """The endpoint stops answering mid-shard (connections refused). Before: botocore's
    EndpointConnectionError, no OSError, went past the retries and ended the run with a long
    traceback. Now it is a failed read: tried again from its sample (the stream then reads on
    as without a fault), and raised as an OSError naming the shard once the tries are spent."""
    url, ref, want = _shard_on_s3(s3_stoppable.bucket, tmp_path, monkeypatch)
    pauses = pauses_that(monkeypatch, s3_stoppable.start if back else lambda: None)
    s = make([url], buffer=4)
    got = [keys(s.next_batch())]
    s3_stoppable.stop()
    if back:
        got += [keys(s.next_batch()) for _ in range(11)]
        assert got == want and s.counters == ref.counters and pauses == [1.0]
        return
    with pytest.raises(OSError, match=rf"^{url}: reading from byte \d+ failed 5 times in a row, "
                                      rf"last: EndpointConnectionError: .*{s3_stoppable.port}"):
        for _ in range(11):
            s.next_batch()
    assert pauses == [1.0, 2.0, 4.0, 8.0]
