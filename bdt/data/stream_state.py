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
one new rank up to twice another's work. Counting needs the owed samples read once here (rank 0,
while the others wait for the checkpoint's conversion anyway); a cut range is read again to find
its cut points. A new rank reads its pending pieces before anything else, then starts its own
epochs of the new split (epoch numbers above every old rank's). Counters are summed into new
rank 0 so totals over ranks stay true; each new rank's shuffle RNG is seeded from (seed, rank,
new world size, epoch). Only whole samples move, read by the same tar reader from the same
offsets. A same-world resume
does not come here: it loads its own state and continues bitwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from bdt import storage, url_listing
from bdt.data.tar_reads import read_failure
from bdt.data.token_shards import read_token_samples

STATE_VERSION = 1


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
            new_world: int) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    """The saved stream states of ranks 0..W-1 -> states for `new_world` ranks (module doc)."""
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
    dealt = _deal(ranges, len(buffered), new_world)
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


def _scan(r: Range, cuts: set[int] = frozenset()) -> tuple[int, dict[int, Range]]:
    """(how many samples `r` keeps, a range starting at its kept sample n for each n in `cuts`),
    read as the stream reads it: a sample index counts samples with something readable, and the
    rest of a damaged shard is skipped."""
    kept, at, index, mark = 0, {}, r.index, (r.last_key, r.last_offset)
    try:
        with contextlib.closing(read_token_samples(r.shard, r.offset)) as samples:
            for s in samples:
                if r.stop is not None and index >= r.stop:
                    break
                if s.members and index % r.stride == r.phase:
                    if kept in cuts:
                        at[kept] = replace(r, offset=s.offset, index=index, last_key=mark[0],
                                           last_offset=mark[1])
                    kept += 1
                index += bool(s.members)
                if s.next_offset != s.offset:  # not a member inside the sample being read
                    mark = (s.key, s.offset)
    except (tarfile.TarError, OSError, EOFError) as e:
        if read_failure(e) is not None:
            raise  # could not be read: the re-split fails naming it, nothing is written
    return kept, at


def _deal(ranges: list[Range], buffered: int, world: int) -> list[list[Range]]:
    """Each new rank's pieces of `ranges` such that, with the buffered samples dealt
    round-robin, every rank owes floor or ceil(all owed / world) samples (module doc)."""
    counts = [_scan(r)[0] for r in ranges]
    total = buffered + sum(counts)
    quota = [total // world + (k < total % world) - buffered // world - (k < buffered % world)
             for k in range(world)]  # never negative: total >= buffered
    spans: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]  # (range, from, to)
    i, used = 0, 0
    for rank in range(world):
        while quota[rank] > 0:
            take = min(quota[rank], counts[i] - used)
            if take:
                spans[rank].append((i, used, used + take))
            quota[rank], used = quota[rank] - take, used + take
            if used == counts[i]:
                i, used = i + 1, 0
    cuts: dict[int, set[int]] = {}
    for i, lo, hi in (s for rank in spans for s in rank):
        cuts.setdefault(i, set()).update(n for n in (lo, hi) if 0 < n < counts[i])
    at = {i: _scan(ranges[i], c)[1] for i, c in cuts.items() if c}
    return [[replace(at[i][lo] if lo else ranges[i],
                     stop=at[i][hi].index if hi < counts[i] else ranges[i].stop)
             for i, lo, hi in rank] for rank in spans]
