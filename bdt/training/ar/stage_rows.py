"""One stage's training rows: token stream -> packed sequence, built ahead by a prefetch worker.

`StageRows` is the picklable recipe (shards, rank, budget, caption tokenizer, packer, the saved
stream state) that a worker thread or spawned process turns into the rows' source
(bdt/data/prefetch.py); `StageData` is the trainer's handle on them: the next row, the stream
counters as of the last row taken, and the stream state to checkpoint (the state after the last
row TAKEN, whatever the worker has built beyond it).

Caption dropout draws from a torch generator seeded, per row, by the stream's own RNG (which the
checkpoint holds): the process-wide torch RNG belongs to the training thread (noise, flips), and
a worker drawing from it would make runs unrepeatable.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from bdt.data.prefetch import Prefetcher, Tensors
from bdt.data.token_shards import TokenSample
from bdt.data.stream_state import StreamCounters
from bdt.data.token_stream import MicroBatch, TokenStream
from bdt.model.sequence import ImageSample, PackedSequence, SequencePacker
from bdt.tokenizer.bits import to_pm1, unpack_bits


def image_samples(batch: MicroBatch, bits: int) -> list[ImageSample]:
    """Token samples -> packer inputs: caption ids and the +-1 bit grid [h, w, C] (unpacked for
    the whole micro-batch at once; each sample's grid is a view of that)."""
    packed = np.concatenate([s.bits_hwB.reshape(-1, s.bits_hwB.shape[-1]) for s in batch.samples])
    pm1_NC = to_pm1(torch.from_numpy(unpack_bits(packed, bits)))
    out, start = [], 0
    for s in batch.samples:
        h, w = s.grid
        out.append(ImageSample(caption=s.caption_ids.tolist(),
                               bits_HWC=pm1_NC[start:start + h * w].view(h, w, bits)))
        start += h * w
    return out


class CaptionMeasure:
    """TokenStream's `measure`: a sample's packed length; fills `sample.caption_ids` with the
    model tokenizer's ids. Holds the `tokenizers` backend of a fast tokenizer when there is one
    (same ids, a quarter of the per-call cost, and a light import in a worker process). A grid
    the packer cannot pack or with a side beyond `max_side` (the model's position table) is a
    ValueError: the stream skips and counts the sample instead of the step failing on it."""

    def __init__(self, tokenizer: Any, packer: SequencePacker, max_side: int | None = None):
        self.packer, self.max_side = packer, max_side
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # a copy: the setting is the tokenizer object's, not per call
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.encode_special_tokens = True  # as encode_user_text: captions are text
        self.backend, self.tokenizer = (backend, None) if backend is not None else (None, tokenizer)

    def ids(self, text: str) -> list[int]:
        if self.backend is not None:
            return self.backend.encode(text, add_special_tokens=False).ids
        from bdt.model.text_tokenizer import encode_user_text

        return encode_user_text(self.tokenizer, text)

    def __call__(self, sample: TokenSample) -> int:
        h, w = sample.grid
        self.packer.image_prefix_ids(h, w)  # ValueError for a grid it cannot pack
        if self.max_side is not None and max(h, w) > self.max_side:
            raise ValueError(f"latent grid {h}x{w} is beyond the 2D position table "
                             f"({self.max_side} tokens per side)")
        sample.caption_ids = np.asarray(self.ids(sample.caption), dtype=np.int32)
        n_prompt = len(self.packer.prompt_ids(sample.caption_ids.tolist()))
        return self.packer.sample_len(n_prompt, h, w)


@dataclass
class Row:
    packed: PackedSequence
    keys: list[str]  # sample keys, in packing order
    tokens: int  # real (unpadded) tokens


@dataclass
class StageRows:
    """Picklable recipe of a stage's rows; calling it (in the worker) opens their source."""

    urls: list[str]
    rank: int
    world_size: int
    token_budget: int
    buffer_size: int
    seed: int
    bits: int
    measure: CaptionMeasure
    state: tuple[dict, Tensors] | None = None  # a checkpoint's stream state to continue from

    def stream(self) -> TokenStream:
        stream = TokenStream(self.urls, self.rank, self.world_size, self.token_budget,
                             self.measure, buffer_size=self.buffer_size, seed=self.seed,
                             bits_per_token=self.bits)
        if self.state is not None:
            stream.load_state_dict(*self.state)
        return stream

    def __call__(self) -> _PackedRows:
        return _PackedRows(self.stream(), self.measure.packer, self.bits)


class _PackedRows:
    """The RowSource of bdt/data/prefetch.py over a TokenStream."""

    def __init__(self, stream: TokenStream, packer: SequencePacker, bits: int):
        self.stream, self.packer, self.bits = stream, packer, bits

    def next_row(self) -> tuple[Tensors, dict]:
        batch = self.stream.next_batch()
        dropout = torch.Generator().manual_seed(int(self.stream.rng.integers(2**63)))
        packed = self.packer.pack(image_samples(batch, self.bits), generator=dropout)
        # The row's own length: the stream measured each sample with its caption, dropped or not.
        extra = {"keys": [s.key for s in batch.samples], "tokens": packed.input_ids_L.numel(),
                 "counters": replace(self.stream.counters)}
        return {f.name: getattr(packed, f.name) for f in fields(packed)}, extra

    def mark(self):
        return self.stream.mark()

    def where(self) -> str:
        return self.stream.where()

    def state_at(self, mark) -> tuple[dict, Tensors]:
        return self.stream.state_dict(mark)


# Per-sample fields the model reads on the host (attention layout, checks): left there, so a
# CUDA step does not wait on device-to-host copies; the per-token ones go to the device.
HOST_FIELDS = frozenset({"cu_seqlens_S1", "causal_len_S", "block_size_S", "grid_hw_S2",
                         "unconditional_S", "position_ids_L"})


class StageData:
    """The trainer's handle on one stage's rows (see the module doc); close() it when done.
    worker "auto": a process on CUDA (the training loop's Python then keeps the GIL to itself),
    a thread on CPU (no process start; CPU training runs in torch's threads)."""

    def __init__(self, rows: StageRows, depth: int, worker: str, device: torch.device,
                 stall_s: float = 0.0):
        self.counters = StreamCounters(**rows.state[0]["counters"]) if rows.state else \
            StreamCounters()
        if worker == "auto":
            worker = "process" if device.type == "cuda" else "thread"
        self._prefetcher = Prefetcher(rows, depth, worker, device, HOST_FIELDS, stall_s)

    @property
    def ready(self) -> int:
        """Rows the worker has built ahead, waiting to be taken."""
        return self._prefetcher.ready

    def next(self) -> Row:
        tensors, extra = self._prefetcher.next()
        self.counters = extra["counters"]
        return Row(PackedSequence(**tensors), extra["keys"], extra["tokens"])

    def state_dict(self) -> tuple[dict, Tensors]:
        return self._prefetcher.state_dict()

    def close(self) -> None:
        self._prefetcher.close()
