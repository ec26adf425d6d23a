"""Re-splitting the token stream over another number of ranks deals the owed samples evenly, and
a rank's share smaller than its buffer never repeats a sample inside an epoch."""

import json

import pytest

from bdt.data.stream_state import resplit
from bdt.data.token_stream import TokenStream
from trainutil import shard_opens, unconsumed_keys, write_shards

GRIDS = [(4, 4), (4, 8), (8, 4), (8, 8)]


def measure(sample):
    h, w = sample.grid
    return 12 + len(sample.caption.split()) + h * w


def make(urls, rank, world, buffer=6):
    return TokenStream(urls, rank, world, 160, measure, buffer_size=buffer, seed=3,
                       bits_per_token=16)


def saved(streams, batches):
    consumed, states = [], []
    for s in streams:
        for _ in range(batches):
            consumed += [x.key for x in s.next_batch().samples]
        meta, tensors = s.state_dict()
        states.append((json.loads(json.dumps(meta)), tensors))
    return consumed, states


@pytest.mark.parametrize("num_shards,per_shard,old,new,batches", [
    (4, 30, 2, 3, 10), (6, 20, 3, 2, 3), (2, 40, 2, 3, 5), (1, 60, 2, 3, 5)])
def test_resplit_deals_owed_samples_evenly(tmp_path, num_shards, per_shard, old, new, batches):
    """Before, ranges went round-robin whole (or halved): 4x30, 2 -> 3 owed 31, 16 and 16."""
    urls = write_shards(str(tmp_path), GRIDS, num_shards=num_shards, per_shard=per_shard)
    consumed, states = saved([make(urls, r, old) for r in range(old)], batches)
    owed_before = sorted(k for r, (m, _) in enumerate(states)
                         for k in unconsumed_keys(m, urls, r, old))
    new_states = resplit(states, urls, 3, new)
    owed = [unconsumed_keys(m, urls, r, new) for r, (m, _) in enumerate(new_states)]
    assert max(map(len, owed)) - min(map(len, owed)) <= 1
    assert sorted(k for o in owed for k in o) == owed_before
    # the new ranks read exactly their pieces before their own epochs, and a re-split of
    # those states again keeps every sample once
    streams = []
    for rank, (meta, tensors) in enumerate(new_states):
        s = make(urls, rank, new)
        s.load_state_dict(meta, tensors)
        streams.append(s)
    more, states = saved(streams, 2)
    again = resplit(states, urls, 3, old)
    rest = [k for r, (m, _) in enumerate(again) for k in unconsumed_keys(m, urls, r, old)]
    everything = [f"s{n:06d}" for n in range(num_shards * per_shard)]
    assert sorted(consumed + more + rest) == everything


def test_resplit_state_without_stop_still_loads(tmp_path):
    """A checkpoint written before pieces had a `stop` holds whole-shard pending ranges."""
    urls = write_shards(str(tmp_path), GRIDS, num_shards=2, per_shard=12)
    consumed, states = saved([make(urls, r, 2) for r in range(2)], 1)
    [(meta, tensors)] = resplit(states, urls, 3, 1)
    owed = unconsumed_keys(meta, urls, 0, 1)
    for r in meta["pending"]:
        assert r.pop("stop") is None  # one new rank: every range whole
    s = make(urls, 0, 1)
    s.load_state_dict(meta, tensors)
    got = []
    while s.pending or s.buffer:
        got += [x.key for x in s.next_batch().samples]
    assert sorted(got) == sorted(owed) and sorted(consumed + got) == [f"s{n:06d}" for n in range(24)]


@pytest.mark.parametrize("world", [1, 3])
def test_tiny_share_repeats_only_across_epochs(tmp_path, world):
    """A share of 5 samples and a buffer of 16: before, the buffer held each sample three
    times, so a micro-batch could take one twice and epoch 1 began before epoch 0 ended."""
    urls = write_shards(str(tmp_path), GRIDS, num_shards=1, per_shard=5 * world)
    for rank in range(world):
        s, got = make(urls, rank, world, buffer=16), []
        while len(got) < 15:
            batch = [x.key for x in s.next_batch().samples]
            assert len(set(batch)) == len(batch)
            got += batch
        share = sorted(k for k in got)[::3]
        assert len(set(share)) == 5
        assert [sorted(got[i:i + 5]) for i in range(0, 15, 5)] == [share] * 3


def test_resplit_with_manifest_counts_opens_only_cut_shards(tmp_path, monkeypatch):
    """Before, a re-split read every owed shard to count it: here 40 shards, at scale hours."""
    urls = write_shards(str(tmp_path), GRIDS, num_shards=40, per_shard=3)
    consumed, states = saved([make(urls, r, 2) for r in range(2)], 2)
    counts = {u: 3 for u in urls}
    opened = shard_opens(monkeypatch)
    new_states = resplit(states, urls, 3, 3, counts)
    assert len(opened) <= 2  # one shard per cut at most: W' - 1
    read_all = resplit(states, urls, 3, 3)  # no manifest: every owed shard read, same deal
    assert len(opened) > 30
    assert [m for m, _ in new_states] == [m for m, _ in read_all]
    owed = [unconsumed_keys(m, urls, r, 3) for r, (m, _) in enumerate(new_states)]
    assert max(map(len, owed)) - min(map(len, owed)) <= 1
    assert sorted(consumed + [k for o in owed for k in o]) == [f"s{n:06d}" for n in range(120)]


@pytest.mark.parametrize("claimed", [25, 1, 0])
def test_resplit_with_wrong_manifest_counts_stays_exact(tmp_path, caplog, claimed):
    """A count off from its shard (12 samples each) deals unevenly but loses nothing: a cut past
    the real end leaves an empty piece (logged), a range counted short still reads to its end."""
    urls = write_shards(str(tmp_path), GRIDS, num_shards=2, per_shard=12)
    consumed, states = saved([make(urls, 0, 1)], 1)
    new_states = resplit(states, urls, 3, 3, {u: claimed for u in urls})
    owed = [k for r, (m, _) in enumerate(new_states) for k in unconsumed_keys(m, urls, r, 3)]
    assert sorted(consumed + owed) == [f"s{n:06d}" for n in range(24)]
    assert ("fewer than counted" in caplog.text) == (claimed == 25)
