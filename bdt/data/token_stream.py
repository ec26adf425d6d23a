"""The training data stream: token shards -> seeded shuffle buffer -> token-budget micro-batches.

One iterator per rank, in the training process (no DataLoader workers): the stream's whole
position is then a handful of numbers this process owns, so a checkpoint records it exactly and
a resume continues with the very next sample. Decoding token shards is cheap next to a training
step (no image decode), so workers would buy little here.

Split: with at least as many shards as ranks, rank r reads shards r, r+W, ...; with fewer, every
rank reads every shard and keeps samples i with i % W == r. Each rank's shard order is reshuffled
per epoch from (seed, rank, epoch). The stream is endless (epochs roll over on their own) and a
step always takes `grad_accum` micro-batches on every rank, so all ranks take the same number
of steps whatever their shard sizes: training length is counted in steps, never in epochs.

Packing (SPEC 1.5: batches of whole images at native aspect, packed into a token budget): a
random buffered sample seeds the micro-batch; samples of the same grid (bucket) are added in
random order while they fit, then the largest remaining ones that still fit. Same-bucket first
keeps a micro-batch's samples alike (and their attention cost predictable); largest-first closes
the gap, which is what keeps real tokens / budget high at mixed aspect ratios.

State (`state_dict`): epoch, shard cursor, byte offset + sample index inside the shard, the
numpy RNG state, counters, and the buffered samples themselves (metadata in the JSON, packed bits
in one uint8 tensor), so nothing is ever read twice.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from bdt.data.shard_source import iter_shard
from bdt.data.token_shards import TokenSample, decode_sample

STATE_VERSION = 1


@dataclass
class MicroBatch:
    samples: list[TokenSample]
    lengths: list[int]  # packed tokens of each sample
    budget: int

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


@dataclass
class StreamCounters:
    samples_read: int = 0  # samples decoded from shards (the resume test counts these)
    corrupt: int = 0  # samples (or shard tails) that failed to decode: skipped
    oversize: int = 0  # samples longer than the budget on their own: skipped
    wrong_bits: int = 0  # samples whose bits per token differ from the model's: skipped
    batches: int = 0
    real_tokens: int = 0
    budget_tokens: int = 0
    samples_out: int = 0

    @property
    def efficiency(self) -> float:
        """Real tokens / budgeted tokens over all micro-batches so far (1 - padding waste)."""
        return self.real_tokens / max(self.budget_tokens, 1)


@dataclass
class _Cursor:
    epoch: int = 0
    shard_pos: int = 0  # index into this epoch's shard order
    offset: int = 0  # byte offset of the next unread sample in that shard
    index: int = 0  # its sample index in the shard


@dataclass
class _Buffered:
    sample: TokenSample
    length: int
    shard: str
    index: int


class TokenStream:
    """Endless per-rank micro-batch stream over `shards` (see module doc).

    `measure(sample) -> int` gives a sample's packed length (prompt + image prefix + h*w, from
    `SequencePacker.sample_len`); it may fill `sample.caption_ids`.
    """

    def __init__(self, shards: list[str], rank: int, world_size: int, token_budget: int,
                 measure: Callable[[TokenSample], int], buffer_size: int = 256, seed: int = 0,
                 bits_per_token: int | None = None):
        if not shards:
            raise ValueError("TokenStream needs at least one shard")
        if token_budget < 1 or buffer_size < 1:
            raise ValueError(f"token_budget and buffer_size must be >= 1, got {token_budget} "
                             f"and {buffer_size}")
        self.all_shards = list(shards)
        self.rank, self.world_size = rank, world_size
        if len(shards) >= world_size:
            self.shards, self.sample_stride = self.all_shards[rank::world_size], 1
        else:
            self.shards, self.sample_stride = list(self.all_shards), world_size
        self.token_budget, self.buffer_size, self.seed = token_budget, buffer_size, seed
        self.measure, self.bits_per_token = measure, bits_per_token
        self.rng = np.random.default_rng([seed, rank, 0x5EED])
        self.cursor = _Cursor()
        self.buffer: list[_Buffered] = []
        self.counters = StreamCounters()
        self._reader = None
        self._epoch_had_samples = False

    # ---- reading ---------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[str]:
        perm = np.random.default_rng([self.seed, self.rank, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def _next_shard(self) -> None:
        self._reader = None
        c = self.cursor
        c.shard_pos, c.offset, c.index = c.shard_pos + 1, 0, 0
        if c.shard_pos >= len(self.shards):
            if not self._epoch_had_samples:
                raise ValueError(f"rank {self.rank}: a whole epoch over {len(self.shards)} shards "
                                 f"(e.g. {self.shards[0]}) gave no usable sample "
                                 f"({asdict(self.counters)})")
            c.epoch, c.shard_pos, self._epoch_had_samples = c.epoch + 1, 0, False

    def _read_one(self) -> _Buffered | None:
        """The next usable sample of this rank, or None when the current shard ended."""
        c = self.cursor
        url = self._order(c.epoch)[c.shard_pos]
        if self._reader is None:
            self._reader = iter_shard(url, c.offset)
        try:
            raw, _, next_offset = next(self._reader)
        except StopIteration:
            self._next_shard()
            return None
        except (tarfile.TarError, OSError, EOFError) as e:
            print(f"warning: {url}: unreadable from byte {c.offset} ({e}); skipping the rest "
                  f"of the shard", flush=True)
            self.counters.corrupt += 1
            self._next_shard()
            return None
        index = c.index
        if next_offset is None:
            self._next_shard()
        else:
            c.offset, c.index = next_offset, c.index + 1
        if index % self.sample_stride != self.rank % self.sample_stride:
            return None
        self.counters.samples_read += 1
        try:
            sample = decode_sample(raw)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            print(f"warning: skipping corrupt sample: {e}", flush=True)
            self.counters.corrupt += 1
            return None
        if self.bits_per_token is not None and sample.bits_per_token != self.bits_per_token:
            self.counters.wrong_bits += 1
            return None
        length = self.measure(sample)
        if length > self.token_budget:
            self.counters.oversize += 1
            return None
        self._epoch_had_samples = True
        return _Buffered(sample, length, url, index)

    def _fill(self) -> None:
        while len(self.buffer) < self.buffer_size:
            item = None
            while item is None:
                item = self._read_one()
            self.buffer.append(item)

    # ---- packing ---------------------------------------------------------------------------
    def next_batch(self) -> MicroBatch:
        """The next micro-batch: whole samples whose packed lengths sum to <= token_budget."""
        self._fill()
        seed = int(self.rng.integers(len(self.buffer)))
        chosen, used = [seed], self.buffer[seed].length
        grid = self.buffer[seed].sample.grid
        same = [i for i, b in enumerate(self.buffer) if i != seed and b.sample.grid == grid]
        for i in self.rng.permutation(len(same)):
            j = same[int(i)]
            if used + self.buffer[j].length <= self.token_budget:
                chosen.append(j)
                used += self.buffer[j].length
        taken = set(chosen)
        # Largest first; ties broken by buffer position (deterministic).
        rest = sorted((i for i in range(len(self.buffer)) if i not in taken),
                      key=lambda i: (-self.buffer[i].length, i))
        for i in rest:
            if used + self.buffer[i].length <= self.token_budget:
                chosen.append(i)
                used += self.buffer[i].length
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
        cfg = [self.all_shards, self.rank, self.world_size, self.seed]
        return hashlib.sha256(json.dumps(cfg).encode()).hexdigest()[:16]

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able state, tensors): everything needed to continue with the next sample."""
        entries, bits = [], []
        for b in self.buffer:
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
                "cursor": asdict(self.cursor), "epoch_had_samples": self._epoch_had_samples,
                "rng": self.rng.bit_generator.state, "counters": asdict(self.counters),
                "buffer": entries}
        flat = torch.cat(bits) if bits else torch.zeros(0, dtype=torch.uint8)
        return meta, {"buffer_bits": flat}

    def load_state_dict(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"data stream state version {meta.get('version')!r}, expected "
                             f"{STATE_VERSION}")
        if meta["fingerprint"] != self._fingerprint():
            raise ValueError("the checkpoint's data stream was built over different shards, rank "
                             "layout or seed than this run's config: resume with the same data "
                             "config (or start a new run directory)")
        self.cursor = _Cursor(**meta["cursor"])
        self._epoch_had_samples = bool(meta["epoch_had_samples"])
        self.rng.bit_generator.state = meta["rng"]
        self.counters = StreamCounters(**meta["counters"])
        flat = tensors["buffer_bits"].numpy()
        self.buffer, pos = [], 0
        for e in meta["buffer"]:
            n = int(np.prod(e["shape"]))
            ids = None if e["caption_ids"] is None else np.asarray(e["caption_ids"], dtype=np.int32)
            sample = TokenSample(key=e["key"], bits_hwB=flat[pos:pos + n].reshape(e["shape"]).copy(),
                                 bits_per_token=e["bits_per_token"], bucket=tuple(e["bucket"]),
                                 caption=e["caption"], source_key=e["source_key"],
                                 source_shard=e["source_shard"], stage=e["stage"], caption_ids=ids)
            self.buffer.append(_Buffered(sample, e["length"], e["shard"], e["index"]))
            pos += n
        self._reader = None
