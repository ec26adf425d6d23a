"""The training data stream: token shards -> seeded shuffle buffer -> token-budget micro-batches.

One iterator per rank, driven by that rank's prefetch worker (bdt/data/prefetch.py: a thread or
a process, no DataLoader): the stream's whole position is a handful of numbers plus its buffer,
so a checkpoint records it exactly and a resume continues with the very next sample. The worker
runs ahead of the step; `mark()` keeps the position after each micro-batch cheaply, so what is
saved is the state after the last micro-batch the trainer TOOK (`state_dict(mark)`).

Split: with at least as many shards as ranks, rank r reads shards r, r+W, ...; with fewer, every
rank reads every shard and keeps samples i with i % W == r. Each rank's shard order is reshuffled
per epoch from (seed, rank, epoch). The stream is endless (epochs roll over on their own) and a
step always takes `grad_accum` micro-batches on every rank, so all ranks take the same number
of steps whatever their shard sizes: training length is counted in steps, never in epochs.

Packing: which buffered samples make a micro-batch is bdt/data/batch_pick.py's.

State (`state_dict`): epoch, shard cursor, byte offset + sample index inside the shard, the
numpy RNG state, counters, the buffered samples themselves (metadata in the JSON, packed bits
in one uint8 tensor) and any pending ranges (below), so nothing is ever read twice. It also
records the size of every shard it holds a byte offset into, and the sample read last there: a
shard rewritten since (say, by a second extraction) would put that offset mid-sample, so a resume
refuses it by name.

World-size change: `resplit` (bdt/data/stream_state.py) turns the saved states of W ranks into
states for W' ranks, exactly.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from bdt import url_listing
from bdt.data.batch_pick import pick
from bdt.data.stream_state import (STATE_VERSION, Cursor, Range, StreamCounters, buffer_items,
                                   cat_bits, check_shard_marks, check_shard_sizes, check_version,
                                   epoch_order, rank_split, same_stream, shard_names,
                                   shards_entered, stream_fingerprint)
from bdt.data.tar_reads import ReadRetries, read_failure
from bdt.data.tars import TarSample, log_skip
from bdt.data.token_shards import TokenSample, decode_tar_sample, read_token_samples

log = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    samples: list[TokenSample]
    lengths: list[int]  # packed tokens of each sample
    budget: int

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


@dataclass
class _Buffered:
    sample: TokenSample
    length: int
    shard: str
    index: int


@dataclass(frozen=True)
class StreamMark:
    """A TokenStream's position at one moment (TokenStream.mark)."""

    cursor: Cursor
    epoch_had_samples: bool
    rng: dict
    counters: StreamCounters
    buffer: list[_Buffered]
    pending: list[Range]


class TokenStream:
    """Endless per-rank micro-batch stream over `shards` (see module doc).

    `measure(sample) -> int` gives a sample's packed length (prompt + image prefix + h*w, from
    `SequencePacker.sample_len`); it may fill `sample.caption_ids`, and raises ValueError for a
    sample the stage cannot pack (its grid), which is then skipped and counted (`bad_grid`).
    """

    def __init__(self, shards: list[str], rank: int, world_size: int, token_budget: int,
                 measure: Callable[[TokenSample], int], buffer_size: int = 256, seed: int = 0,
                 bits_per_token: int | None = None):
        if not shards:
            raise ValueError("TokenStream needs at least one shard")
        if token_budget < 1 or buffer_size < 1:
            raise ValueError(f"token_budget and buffer_size must be >= 1, got {token_budget} "
                             f"and {buffer_size}")
        self.given_shards = list(shards)  # what a state saved by an earlier bdt is checked on
        self.all_shards = shard_names(shards)  # read and recorded by these (stream_state)
        self.rank, self.world_size = rank, world_size
        self.shards, self.sample_stride = rank_split(self.all_shards, rank, world_size)
        self.token_budget, self.buffer_size, self.seed = token_budget, buffer_size, seed
        self.measure, self.bits_per_token = measure, bits_per_token
        self.rng = np.random.default_rng([seed, rank, 0x5EED])
        self.cursor = Cursor()
        self.buffer: list[_Buffered] = []
        self.pending: list[Range] = []  # read first: work handed over by a re-split
        self.counters = StreamCounters()
        self._reader = None
        self._order_of: tuple[int, list[str]] = (-1, [])
        self._epoch_had_samples = False
        self._retries = ReadRetries(log)
        self._damaged: set[str] = set()  # shards whose damage was logged (once per run)
        # Members without an extension counted since the position last moved (they lie inside
        # the sample being read), and how many of them a read again from there meets first.
        self._inside = self._again = 0

    # ---- reading ---------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[str]:
        # Asked before every read: computing the permutation each time cost ~5% of the stream.
        if self._order_of[0] != epoch:
            self._order_of = (epoch, epoch_order(self.shards, self.seed, self.rank, epoch))
        return self._order_of[1]

    def _position(self) -> tuple[str, int, int, int, int]:
        """(shard, byte offset, sample index, stride, phase) of the next read."""
        if self.pending:
            r = self.pending[0]
            return r.shard, r.offset, r.index, r.stride, r.phase
        c = self.cursor
        return (self._order(c.epoch)[c.shard_pos], c.offset, c.index, self.sample_stride,
                self.rank % self.sample_stride)

    def where(self) -> str:
        """What the stream reads now, for a report (asked from another thread)."""
        url, offset = self._position()[:2]
        return f"reading {url} from byte {offset}"

    def _advance(self, offset: int, index: int, read: TarSample) -> None:
        where = self.pending[0] if self.pending else self.cursor
        where.offset, where.index = offset, index
        where.last_key, where.last_offset = read.key, read.offset
        self._inside = 0

    def _next_shard(self) -> None:
        self._reader, self._inside = None, 0
        if self.pending:
            self.pending.pop(0)
            return
        c = self.cursor
        c.shard_pos, c.offset, c.index, c.last_key = c.shard_pos + 1, 0, 0, None
        if c.shard_pos >= len(self.shards):
            if not self._epoch_had_samples:
                raise ValueError(f"rank {self.rank}: a whole epoch over {len(self.shards)} shards "
                                 f"(e.g. {self.shards[0]}) gave no usable sample "
                                 f"({asdict(self.counters)})")
            c.epoch, c.shard_pos, self._epoch_had_samples = c.epoch + 1, 0, False

    def _read_one(self) -> _Buffered | None:
        """The next usable sample of this rank, or None when the current shard ended."""
        if self.pending and self.pending[0].stop is not None and \
                self.pending[0].index >= self.pending[0].stop:
            self._next_shard()  # the re-split gave the rest of the shard to another rank
            return None
        url, offset, index, stride, phase = self._position()
        regular = not self.pending
        if self._reader is None:
            self._reader = read_token_samples(url, offset)
        try:
            tar_sample = next(self._reader)
        except StopIteration:
            self._next_shard()
            return None
        except (tarfile.TarError, OSError, EOFError) as e:
            failure = read_failure(e)
            if failure is None:
                self._skip_damaged(url, offset, e)
            else:
                self._reader, self._again = None, self._inside
                self._retries.pause(f"{url}: reading from byte {offset}", failure)
            return None
        self._retries.failed = 0
        last = tar_sample.next_offset is None
        item = None
        if not tar_sample.members:  # nothing readable (unsafe path, link, over its limit)
            # A member without an extension lies inside the sample being read: the position
            # stays, and a read tried again from there meets it first, counted already.
            inside = tar_sample.next_offset == tar_sample.offset
            if inside and self._again:
                self._again -= 1
            else:
                self._inside += inside
                self._skip("corrupt", tar_sample.key, url,
                           f"nothing readable: {tar_sample.refused}")
            if not (last or inside):
                self._advance(tar_sample.next_offset, index, tar_sample)
        else:
            if not last:
                self._advance(tar_sample.next_offset, index + 1, tar_sample)
            if index % stride == phase:
                item = self._usable(tar_sample, url, index, regular)
        if last:  # only now: the end of an epoch checks whether it gave a usable sample
            self._next_shard()
        return item

    def _skip_damaged(self, url: str, offset: int, e: Exception) -> None:
        """Bad bytes (a cut or damaged tar): the rest of the shard is skipped, in every epoch
        (counted in data/corrupt), but logged once: a long run would log it every epoch."""
        self.counters.corrupt += 1
        if url not in self._damaged:
            self._damaged.add(url)
            log.warning("%s: unreadable from byte %d (%s); skipping the rest of the shard in "
                        "every epoch (counted in data/corrupt, not logged again)", url, offset, e)
        self._next_shard()

    def _usable(self, tar_sample: TarSample, url: str, index: int, regular: bool
                ) -> _Buffered | None:
        """The sample decoded and measured, or None (counted) when this stage cannot use it."""
        self.counters.samples_read += 1
        try:
            sample = decode_tar_sample(tar_sample, url)
        except ValueError as e:  # its one error type, naming the sample
            return self._skip("corrupt", tar_sample.key, url, str(e))
        if self.bits_per_token is not None and sample.bits_per_token != self.bits_per_token:
            return self._skip("wrong_bits", sample.key, url, f"{sample.bits_per_token} bits per "
                              f"token, the model takes {self.bits_per_token}")
        try:
            length = self.measure(sample)
        except ValueError as e:  # e.g. a grid not in whole patches, from a bare glob's odd shard
            return self._skip("bad_grid", sample.key, url, str(e))
        if length > self.token_budget:
            return self._skip("oversize", sample.key, url,
                              f"packs {length} tokens, the budget is {self.token_budget}")
        # Pending ranges belong to old epochs: they say nothing about this split's epoch.
        self._epoch_had_samples = self._epoch_had_samples or regular
        return _Buffered(sample, length, url, index)

    def _skip(self, kind: str, key: str, url: str, why: str) -> None:
        count = getattr(self.counters, kind) + 1
        setattr(self.counters, kind, count)
        log_skip(log, count, NOTED_SKIPS, "skipping sample %r in %s (%s): %s", key, url, kind, why,
                 counted_in=f" in data/{kind}")

    def _fill(self) -> None:
        # A buffer holding an epoch's samples (or a re-split's pieces) empties before the next
        # epoch is read: an epoch is one (a share smaller than the buffer repeated inside it).
        c = self.cursor
        while len(self.buffer) < self.buffer_size:
            if self.buffer and not self.pending and (c.shard_pos, c.offset, c.index) == (0, 0, 0):
                return
            item = self._read_one()
            if item is not None:
                self.buffer.append(item)

    # ---- packing ---------------------------------------------------------------------------
    def next_batch(self) -> MicroBatch:
        """The next micro-batch: whole samples whose packed lengths sum to <= token_budget."""
        self._fill()
        chosen, used = pick([b.length for b in self.buffer],
                            [b.sample.grid for b in self.buffer], self.token_budget, self.rng)
        taken = set(chosen)
        items = [self.buffer[i] for i in chosen]
        self.buffer = [b for i, b in enumerate(self.buffer) if i not in taken]
        c = self.counters
        c.batches, c.real_tokens, c.budget_tokens = c.batches + 1, c.real_tokens + used, \
            c.budget_tokens + self.token_budget
        c.samples_out += len(items)
        return MicroBatch([b.sample for b in items], [b.length for b in items], self.token_budget)

    # ---- state -----------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        return stream_fingerprint(self.all_shards, self.rank, self.world_size, self.seed)

    def mark(self) -> StreamMark:
        """The stream's position now, kept cheaply (the buffer is copied as references: buffered
        samples are never changed), so a prefetching worker can run ahead and the state of the
        last batch the trainer CONSUMED can still be saved (`state_dict(mark)`)."""
        return StreamMark(replace(self.cursor), self._epoch_had_samples,
                          self.rng.bit_generator.state, replace(self.counters), list(self.buffer),
                          [replace(r) for r in self.pending])

    def state_dict(self, mark: StreamMark | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able state, tensors): everything needed to continue with the next sample after
        `mark` (default: now). Reads only the mark, so another thread may go on reading."""
        m = self.mark() if mark is None else mark
        entries, bits = [], []
        for b in m.buffer:
            s = b.sample
            entries.append({"key": s.key, "shard": b.shard, "index": b.index, "length": b.length,
                            "shape": list(s.bits_hwB.shape), "bits_per_token": s.bits_per_token,
                            "bucket": list(s.bucket), "caption": s.caption,
                            "caption_ids": None if s.caption_ids is None else
                            [int(x) for x in s.caption_ids],
                            "source_key": s.source_key, "source_shard": s.source_shard,
                            "stage": s.stage})
            bits.append(torch.from_numpy(np.ascontiguousarray(s.bits_hwB).reshape(-1)))
        meta = {"version": STATE_VERSION, "fingerprint": self._fingerprint(),
                "cursor": asdict(m.cursor), "epoch_had_samples": m.epoch_had_samples,
                "rng": m.rng, "counters": asdict(m.counters),
                "buffer": entries, "pending": [asdict(r) for r in m.pending]}
        meta["shard_sizes"] = url_listing.file_sizes(shards_entered(meta, self.all_shards, self.rank,
                                                                 self.world_size, self.seed))
        return meta, {"buffer_bits": cat_bits(bits)}

    def load_state_dict(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        check_version(meta)
        if not same_stream(meta, self.given_shards, self.rank, self.world_size, self.seed):
            raise ValueError("the checkpoint's data stream was built over different shards, rank "
                             "layout or seed than this run's config: resume with the same data "
                             "config (or start a new run directory)")
        check_shard_sizes(meta)
        check_shard_marks(meta, self.all_shards, self.rank, self.world_size, self.seed)
        self.cursor = Cursor(**meta["cursor"])
        self._epoch_had_samples = bool(meta["epoch_had_samples"])
        self.rng.bit_generator.state = meta["rng"]
        self.counters = StreamCounters(**meta["counters"])
        self.buffer = []
        for e, bits in buffer_items(meta, tensors):
            ids = None if e["caption_ids"] is None else np.asarray(e["caption_ids"], dtype=np.int32)
            sample = TokenSample(key=e["key"], bits_hwB=bits.numpy().reshape(e["shape"]).copy(),
                                 bits_per_token=e["bits_per_token"], bucket=tuple(e["bucket"]),
                                 caption=e["caption"], source_key=e["source_key"],
                                 source_shard=e["source_shard"], stage=e["stage"], caption_ids=ids)
            self.buffer.append(_Buffered(sample, e["length"], e["shard"], e["index"]))
        self._measure_buffer_again()
        self.pending = [Range(**r) for r in meta.get("pending", [])]
        self._reader = None

    def _measure_buffer_again(self) -> None:
        """Buffered lengths are the saving run's: a resume with another token budget or P
        measures them with this stage's packer (the same config measures the same lengths);
        a sample it cannot pack now is skipped and counted, as when read."""
        kept = []
        for item in self.buffer:
            try:
                item.length = self.measure(item.sample)
            except ValueError as e:
                self._skip("bad_grid", item.sample.key, item.shard, str(e))
                continue
            if item.length > self.token_budget:
                self._skip("oversize", item.sample.key, item.shard, f"packs {item.length} tokens, "
                           f"the budget is {self.token_budget}")
                continue
            kept.append(item)
        self.buffer = kept


# A budget that fits only some grids skips many samples: the first NOTED_SKIPS of each kind are
# logged by key, then the counter in the metrics (data/<kind>) says how many.
NOTED_SKIPS = 10
