"""The token stream's saved state, and how it moves between world sizes.

World-size change (`resplit`): the saved states of all W old ranks become states for W' new
ranks, exactly: every sample of each old rank's current epoch is consumed once, before or after
the change, never twice and never not at all. A rank's unconsumed work is
  * its buffered samples (read, not yet batched), and
  * its unread ranges: the rest of the shard it is in (from the saved byte offset) and the
    shards after it in its epoch order, each with the old rank's sample filter (stride, phase:
    keep the samples whose index in the shard % stride == phase), plus ranges still pending from
    an earlier re-split. An epoch the rank has not started (cursor at its first byte) is no work.
The union over old ranks is dealt evenly by sample count: every new rank gets
floor or ceil(owed / W') samples, so all finish the old epoch together. The buffered samples go
round-robin (old rank 0's first), then the ranges, in turn (first the ones each old rank was
inside), are cut into contiguous pieces that fill each new rank's remaining quota: a piece
starts at a sample's byte offset and `stop`s before the sample index where the next piece
begins. The unit is the sample, not the shard: shards of a few samples per rank would leave
one new rank up to twice another's work. A range keeps the sample indices from its first
kept one on, stride apart, up to its shard's count: given the manifest's count
(ShardList.samples) its count and the indices of its cuts are arithmetic; only a shard without
one (plain globbed shards; a manifest makes re-splits cheap) is read to count it. Then only the
ranges holding a cut are read, each once up to its last cut, for the cut's byte offset: at most
W' - 1 shards, where reading all owed data (an epoch just begun: nearly all of it) would take
hours on rank 0 at a resume. A count off from its shard (a stale manifest entry, damage) makes
the deal uneven, never inexact: a piece ends at a sample index and a range's last piece where
the range did, so a cut past the real end leaves an empty piece (dropped, logged) and the piece
before it reads to the end. A new rank reads its pending pieces before anything else, then
starts its own epochs of the new split (epoch numbers above every old rank's). Counters are
summed into new rank 0 so totals over ranks stay true; each new rank's shuffle RNG is seeded
from (seed, rank, new world size, epoch). Only whole samples move, read by the same tar reader
from the same offsets. A same-world resume does not come here: it loads its own state and
continues bitwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from bdt import storage, url_listing
from bdt.data.tar_reads import read_failure
from bdt.data.token_shards import read_token_samples

STATE_VERSION = 1
log = logging.getLogger(__name__)


@dataclass
class StreamCounters:
    samples_read: int = 0  # samples decoded from shards (the resume test counts these)
    corrupt: int = 0  # samples (or shard tails) that failed to decode: skipped
    oversize: int = 0  # samples longer than the budget on their own: skipped
    wrong_bits: int = 0  # samples whose bits per token differ from the model's: skipped
    bad_grid: int = 0  # samples whose grid the stage cannot pack (measure refused it): skipped
    batches: int = 0
    real_tokens: int = 0
    budget_tokens: int = 0
    samples_out: int = 0

    @property
    def efficiency(self) -> float:
        """Real tokens / budgeted tokens over all micro-batches so far (1 - padding waste)."""
        return self.real_tokens / max(self.budget_tokens, 1)


@dataclass
class Cursor:
    epoch: int = 0
    shard_pos: int = 0  # index into this epoch's shard order
    offset: int = 0  # byte offset of the next unread sample in that shard
    index: int = 0  # its sample index in the shard
    last_key: str | None = None  # the sample read last in that shard, ending at `offset`,
    last_offset: int = 0  # and where it starts (check_shard_marks)


@dataclass
class Range:
    """Unread work handed over by a re-split: `shard` from byte `offset` (sample `index`) up to
    sample `stop`, keeping the samples whose index % stride == phase."""

    shard: str
    offset: int = 0
    index: int = 0
    stride: int = 1
    phase: int = 0
    last_key: str | None = None  # as Cursor's
    last_offset: int = 0
    stop: int | None = None  # the range ends before this sample index (None: the shard's end)


def rank_split(all_shards: list[str], rank: int, world: int) -> tuple[list[str], int]:
    """(this rank's shards, sample stride): whole shards when there are enough, else samples."""
    if len(all_shards) >= world:
        return all_shards[rank::world], 1
    return list(all_shards), world


def epoch_order(shards: list[str], seed: int, rank: int, epoch: int) -> list[str]:
    perm = np.random.default_rng([seed, rank, epoch]).permutation(len(shards))
    return [shards[i] for i in perm]


def shard_names(urls: list[str]) -> list[str]:
    """The names a stream reads, records and fingerprints its shards by: a local shard by its
    absolute real path (a relative name, `~/x`, `a/../b` or a link naming the same files is the
    same shard; a relative name from another working directory may be another), a remote URL
    as given. A run dir resumed on another node with the same mount finds the same names."""
    return [u if storage.is_remote(u) else storage.real_local_path(u) for u in urls]


def stream_fingerprint(all_shards: list[str], rank: int, world: int, seed: int) -> str:
    return _digest(shard_names(all_shards), rank, world, seed)


def _digest(names: list[str], rank: int, world: int, seed: int) -> str:
    return hashlib.sha256(json.dumps([names, rank, world, seed]).encode()).hexdigest()[:16]


def same_stream(meta: dict, all_shards: list[str], rank: int, world: int, seed: int) -> bool:
    """Whether a saved state was read from `all_shards` (as `rank` of `world`, with `seed`).
    A state saved before shards were named by real path hashed the names as given: accepted
    where those are absolute or remote (they named the same files from any directory)."""
    if meta.get("fingerprint") == stream_fingerprint(all_shards, rank, world, seed):
        return True
    given = list(all_shards)
    return all(storage.is_remote(u) or os.path.isabs(u) for u in given) and \
        meta.get("fingerprint") == _digest(given, rank, world, seed)


def check_version(meta: dict) -> None:
    if meta.get("version") != STATE_VERSION:
        raise ValueError(f"data stream state version {meta.get('version')!r}, expected "
                         f"{STATE_VERSION}")


def cat_bits(bits: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(bits) if bits else torch.zeros(0, dtype=torch.uint8)


def buffer_items(meta: dict, tensors: dict[str, torch.Tensor]) -> list[tuple[dict, torch.Tensor]]:
    """(entry, its packed bits, flat) of every buffered sample of a saved state."""
    flat, out, pos = tensors["buffer_bits"], [], 0
    for e in meta["buffer"]:
        n = int(np.prod(e["shape"]))
        out.append((e, flat[pos:pos + n]))
        pos += n
    return out


def shards_entered(meta: dict, all_shards: list[str], rank: int, world: int,
                    seed: int) -> list[str]:
    """The shards a saved state holds a byte offset into (its cursor's, its pending ranges')."""
    return sorted({r.shard for r in unread_ranges(meta, all_shards, rank, world, seed)
                   if r.offset > 0})


# What a resume says of a shard rewritten since its state was saved (check_shard_sizes and
# check_shard_marks).
_REWRITTEN = ("it was rewritten since (a new extraction?), so the saved read position no longer "
              "points at a sample. Put the original shard back, or start a new run directory "
              "(init_from= keeps the weights)")


def check_shard_sizes(meta: dict) -> None:
    """A shard rewritten since the state was saved would put its byte offset mid-sample."""
    saved = meta.get("shard_sizes", {})  # states written before sizes were recorded have none
    for url, now in url_listing.file_sizes(list(saved)).items():
        if now != saved[url]:
            raise ValueError(f"token shard {url} is {'gone' if now is None else f'{now} bytes'} "
                             f"but was {saved[url]} bytes when the checkpoint was saved: "
                             f"{_REWRITTEN}")


def check_shard_marks(meta: dict, all_shards: list[str], rank: int, world: int,
                      seed: int) -> None:
    """A shard rewritten to the same size passes check_shard_sizes (tars pad to 10 KiB records:
    40 or 41 samples made the same 256,000 bytes): the sample read last before each saved offset
    must still start where it did, under its key, and end at that offset."""
    for r in unread_ranges(meta, all_shards, rank, world, seed):
        if r.offset == 0 or r.last_key is None:  # nothing read in it, or saved before marks
            continue
        try:
            with contextlib.closing(read_token_samples(r.shard, r.last_offset)) as samples:
                found = next(samples, None)  # closed now: the shard's file with it
        except (tarfile.TarError, OSError, EOFError) as e:
            if read_failure(e) is not None:
                raise  # the shard could not be read (I/O, network): says nothing about its bytes
            found = None
        if found is None or (found.key, found.next_offset) != (r.last_key, r.offset):
            raise ValueError(f"token shard {r.shard} no longer holds sample {r.last_key!r} at "
                             f"byte {r.last_offset}, where the checkpoint's data stream read it: "
                             f"{_REWRITTEN}")


def unread_ranges(meta: dict, all_shards: list[str], rank: int, world: int,
                  seed: int) -> list[Range]:
    """The ranges a saved rank state has not read yet in its current epoch (module doc)."""
    shards, stride = rank_split(list(all_shards), rank, world)
    c = Cursor(**meta["cursor"])
    out = [Range(**r) for r in meta.get("pending", [])]
    if (c.shard_pos, c.offset) != (0, 0):  # an epoch not begun is no unconsumed work
        order = epoch_order(shards, seed, rank, c.epoch)
        out.append(Range(order[c.shard_pos], c.offset, c.index, stride, rank % stride,
                         c.last_key, c.last_offset))
        out += [Range(url, 0, 0, stride, rank % stride) for url in order[c.shard_pos + 1:]]
    return out


def resplit(states: list[tuple[dict, dict[str, torch.Tensor]]], all_shards: list[str], seed: int,
            new_world: int, samples: Mapping[str, int] | None = None
            ) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    """The saved stream states of ranks 0..W-1 -> states for `new_world` ranks (module doc).
    `samples`: shard URL -> its sample count (ShardList.samples, from a manifest)."""
    old_world = len(states)
    for rank, (meta, _) in enumerate(states):
        check_version(meta)
        if not same_stream(meta, all_shards, rank, old_world, seed):
            raise ValueError(f"data stream state of old rank {rank} (of {old_world}) was built "
                             f"over different shards or seed than this run's config: re-split "
                             f"needs the same data config")
        check_shard_sizes(meta)
    all_shards = shard_names(all_shards)  # the pending ranges name them as the new streams do
    per_rank = [unread_ranges(m, all_shards, r, old_world, seed) for r, (m, _) in enumerate(states)]
    ranges = [rs[i] for i in range(max(map(len, per_rank), default=0)) for rs in per_rank
              if i < len(rs)]
    buffered = [item for meta, tensors in states for item in buffer_items(meta, tensors)]
    samples = samples or {}
    dealt = _deal(ranges, len(buffered), new_world, dict(zip(shard_names(list(samples)),
                                                             samples.values())))
    epoch = max(m["cursor"]["epoch"] for m, _ in states) + 1
    totals = StreamCounters()
    for meta, _ in states:
        for k, v in meta["counters"].items():
            setattr(totals, k, getattr(totals, k) + v)
    out = []
    for rank in range(new_world):
        mine = buffered[rank::new_world]
        rng = np.random.default_rng([seed, rank, 0x5EED, new_world, epoch])
        meta = {"version": STATE_VERSION,
                "fingerprint": stream_fingerprint(all_shards, rank, new_world, seed),
                "cursor": asdict(Cursor(epoch=epoch)), "epoch_had_samples": False,
                "rng": rng.bit_generator.state,
                "counters": asdict(totals if rank == 0 else StreamCounters()),
                "buffer": [e for e, _ in mine],
                "pending": [asdict(r) for r in dealt[rank]]}
        out.append((meta, {"buffer_bits": cat_bits([b for _, b in mine])}))
    return out


def _first(r: Range) -> int:
    """The sample index of the first sample `r` keeps."""
    return r.index + (r.phase - r.index) % r.stride


def _kept(r: Range, counts: Mapping[str, int]) -> int:
    """How many samples `r` keeps: from its shard's manifest count where there is one (no read),
    else read as the stream reads it (a sample index counts samples with something readable;
    the rest of a damaged shard is skipped)."""
    end = counts.get(r.shard)
    if end is None:
        end = r.index
        with _skipping_damage(), contextlib.closing(read_token_samples(r.shard, r.offset)) as got:
            for s in got:
                if r.stop is not None and end >= r.stop:
                    break
                end += bool(s.members)
    if r.stop is not None:
        end = min(end, r.stop)
    return max(0, -(-(end - _first(r)) // r.stride))


def _starts(r: Range, indices: set[int]) -> dict[int, Range]:
    """A range like `r` starting at each of its sample `indices`, read from r's offset up to the
    last of them; an index past the shard's real end (or its damage) has none."""
    at, index, mark, last = {}, r.index, (r.last_key, r.last_offset), max(indices)
    with _skipping_damage(), contextlib.closing(read_token_samples(r.shard, r.offset)) as got:
        for s in got:
            if s.members and index in indices:
                at[index] = replace(r, offset=s.offset, index=index, last_key=mark[0],
                                    last_offset=mark[1])
                if index == last:
                    break
            index += bool(s.members)
            if s.next_offset != s.offset:  # not a member inside the sample being read
                mark = (s.key, s.offset)
    return at


@contextlib.contextmanager
def _skipping_damage():
    """Bad bytes end a shard, as the stream skips them; a failed read (I/O, network) fails the
    re-split naming the shard, before anything is written."""
    try:
        yield
    except (tarfile.TarError, OSError, EOFError) as e:
        if read_failure(e) is not None:
            raise


def _deal(ranges: list[Range], buffered: int, world: int,
          counts: Mapping[str, int]) -> list[list[Range]]:
    """Each new rank's pieces of `ranges` such that, with the buffered samples dealt
    round-robin, every rank owes floor or ceil(all owed / world) samples (module doc)."""
    kept = [_kept(r, counts) for r in ranges]
    total = buffered + sum(kept)
    quota = [total // world + (k < total % world) - buffered // world - (k < buffered % world)
             for k in range(world)]  # never negative: total >= buffered; they sum to sum(kept)
    spans: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]  # (range, from, to)
    rank = 0
    for i, n in enumerate(kept):
        lo = 0
        while True:  # a range counted empty is still dealt: a manifest count may be low
            while quota[rank] == 0 and rank < world - 1:
                rank += 1
            take = min(quota[rank], n - lo)
            spans[rank].append((i, lo, lo + take))
            quota[rank], lo = quota[rank] - take, lo + take
            if lo == n:
                break
    starts: dict[int, set[int]] = {}
    for i, lo, _ in (s for rank_spans in spans for s in rank_spans):
        if lo:
            starts.setdefault(i, set()).add(_first(ranges[i]) + lo * ranges[i].stride)
    found = {i: _starts(ranges[i], wanted) for i, wanted in starts.items()}
    out: list[list[Range]] = [[] for _ in range(world)]
    for rank, rank_spans in enumerate(spans):
        for i, lo, hi in rank_spans:
            r = ranges[i]
            begin = r if lo == 0 else found[i].get(_first(r) + lo * r.stride)
            if begin is None:  # the pieces before read to the real end: nothing is lost
                log.warning("re-split: token shard %s holds no sample %d, fewer than counted (a "
                            "stale manifest count or a damaged shard): new rank %d owes fewer "
                            "samples than the others", r.shard, _first(r) + lo * r.stride, rank)
                continue
            out[rank].append(replace(begin, stop=_first(r) + hi * r.stride if hi < kept[i]
                                     else r.stop))
    return out
