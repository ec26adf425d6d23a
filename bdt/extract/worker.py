"""The Ray actor of the extraction job: holds the tokenizer, turns one input unit into shards.

`ShardEncoder` is plain Python here; run.py wraps it with `ray.remote` (resources, restarts).
It lives in the installed package because Ray workers import it by name (environment.md).

Per unit: stages whose done-marker is valid are skipped; the others are rebuilt from scratch.
Samples stream through: read -> validate caption -> decode once -> resize + center-crop per
stage -> batch per (stage, bucket) -> encode -> pack -> append to that stage's tar. Outputs
become visible only when complete: the tars first, then the unit's rejects file, then the
markers LAST, so a kill at any point leaves either a done shard or one that the next run redoes.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from bdt import storage
from bdt.data.images import DECODE_VERSION, ImageRejected, formats_for, load_for_buckets
from bdt.data.shard_writer import ShardWriter
from bdt.data.token_shards import TokenSample, encode_sample, sample_key
from bdt.extract.input_reading import RawSample, Reject, check_caption, iter_unit
from bdt.extract.input_units import InputUnit
from bdt.extract import manifest as mf

T = TypeVar("T")
R = TypeVar("R")

def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only; elsewhere a no-op).

    Measured: an actor's RSS crept from 360 to 690 MB over 16 shards of 50 images, yet fell to
    290 MB after malloc_trim with a constant Python object count: allocator retention from
    decode/encode buffers, not a leak. Trimming once per shard keeps a long job's memory flat.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RejectsSpool:
    """A unit's rejects as JSON lines in an anonymous temp file (memory past 1 MiB), counted and
    hashed as they come. Held as objects, a tar of 2 million empty captions (1 GB, under every
    size limit) took an actor to 1.2 GB; spooled, its rejects cost disk and no memory."""

    def __init__(self):
        self.count, self._sha = 0, hashlib.sha256()
        self._file = tempfile.SpooledTemporaryFile(max_size=1 << 20)

    def __enter__(self) -> _RejectsSpool:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def add(self, reject: Reject) -> None:
        line = (json.dumps(reject.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")
        self._sha.update(line)
        self._file.write(line)
        self.count += 1

    def publish(self, url: str) -> str:
        """Write the rejects file at `url` (none without rejects); its sha256, "" without."""
        if not self.count:
            return ""
        self._file.seek(0)
        with storage.open_atomic(url) as f:
            shutil.copyfileobj(self._file, f, 1 << 20)
        return self._sha.hexdigest()


class ShardEncoder:
    def __init__(self, cfg: dict[str, Any], fingerprint: str, stage_buckets: dict[str, list[list[int]]]):
        import torch
        from omegaconf import OmegaConf

        from bdt.config import literal_config
        from bdt.extract.config import ExtractConfig, encode_dtype
        from bdt.tokenizer import load_tokenizer

        self.cfg = OmegaConf.merge(OmegaConf.structured(ExtractConfig), literal_config(cfg))
        self.fingerprint = fingerprint
        self.stage_buckets = {k: [tuple(b) for b in v] for k, v in stage_buckets.items()}
        self.formats = formats_for(self.cfg.image_extensions)
        torch.set_num_threads(max(1, int(self.cfg.cpus_per_actor)))
        use_gpu = self.cfg.gpus_per_actor > 0 and torch.cuda.is_available()
        self.device = "cuda" if use_gpu else "cpu"
        dtype = getattr(torch, encode_dtype(self.cfg))
        self.model = load_tokenizer(self.cfg.tokenizer, dtype=dtype, device=self.device)
        # (unit index, inputs read, rejected) of the shard being written, None between shards:
        # read by `progress()` from another thread; one tuple assignment keeps it consistent.
        self._live: tuple[int, int, int] | None = None

    def encode(self, pixels_BHWC: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> packed bits uint8 [B, h, w, C/8].

        A short batch (a bucket's last one in a shard) is padded with black images to the next
        multiple of a quarter batch: every new input shape makes oneDNN (CPU) or cuDNN (GPU)
        build and cache new convolution kernels, and with batches of any size 1..batch_size per
        bucket that cache grows with every shard for a long time (measured: about half of an
        actor's memory creep). Quarters, or the next power of two where that is less, bound it to
        4 + log2(batch_size / 4) shapes per bucket, for at most a quarter batch of padding per
        bucket and shard and at most as many black images as real ones (a batch size far above a
        shard's images padded 3 images to 1000 at batch_size 4000). The tokenizer treats the
        images of a batch independently (GroupNorm is per image), so padding changes no bit."""
        import torch

        from bdt.tokenizer.bits import pack_bits

        n = len(pixels_BHWC)
        quarter = max(1, -(-int(self.cfg.batch_size) // 4))
        padded = max(n, min(-(-n // quarter) * quarter, 1 << (n - 1).bit_length(), int(self.cfg.batch_size)))
        if padded > n:
            pad = np.zeros((padded - n, *pixels_BHWC.shape[1:]), pixels_BHWC.dtype)
            pixels_BHWC = np.concatenate([pixels_BHWC, pad])
        # uint8 crosses to the device (4x less than float32), then [0, 255] -> [-1, 1] there.
        x_BHWC = torch.from_numpy(pixels_BHWC).to(self.device)
        x_BCHW = x_BHWC.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.inference_mode():
            bits_BhwC = self.model.encode(x_BCHW)
        return pack_bits(bits_BhwC[:n].cpu().numpy())

    def progress(self) -> tuple[int, int, int] | None:
        """Counts inside the current shard. run.py calls this in its own concurrency group, so
        the answer comes while `process` is still running."""
        return self._live

    def process(self, unit_dict: dict[str, Any]) -> dict[str, Any]:
        """Make every missing shard of one unit; returns {"index", "stages": {name: marker}, ...}."""
        t0 = time.time()
        unit = InputUnit(**unit_dict)
        root = self.cfg.output
        markers: dict[str, dict] = {}
        for stage in self.stage_buckets:
            marker = mf.valid_marker(root, stage, unit, self.fingerprint)
            if marker is not None:
                markers[stage] = marker
        todo = [s for s in self.stage_buckets if s not in markers]
        if todo:
            try:
                markers.update(self._extract(unit, todo))
            finally:
                self._live = None
            _return_freed_memory()
        return {"index": unit.index, "skipped": not todo, "stages": markers, "seconds": time.time() - t0}

    def _extract(self, unit: InputUnit, stages: list[str]) -> dict[str, dict]:
        cfg, root = self.cfg, self.cfg.output
        inputs = 0
        with _RejectsSpool() as rejects:
            with contextlib.ExitStack() as stack:
                storage.remove_stale_temps(mf.rejects_url(root, unit.index))
                shards: dict[str, ShardWriter] = {}
                for stage in stages:
                    storage.remove_stale_temps(mf.marker_url(root, stage, unit.index))
                    shards[stage] = stack.enter_context(ShardWriter(mf.shard_url(root, stage, unit.index)))
                pending: dict[tuple[str, tuple[int, int]], list[tuple[str, str, np.ndarray, str]]] = {}

                def flush(group: tuple[str, tuple[int, int]]) -> None:
                    batch = pending.pop(group)
                    packed = self.encode(np.stack([b[2] for b in batch]))
                    for (key, src_key, _, caption), bits in zip(batch, packed):
                        shards[group[0]].write(encode_sample(TokenSample(
                            key=key, bits_hwB=bits, bits_per_token=self.model.bits_per_token, bucket=group[1],
                            caption=caption, source_key=src_key, source_shard=unit.name, stage=group[0])))

                keys: set[str] = set()
                upscaled = dict.fromkeys(stages, 0)  # samples smaller than their bucket, per stage
                icc_ignored = 0  # samples whose image's ICC profile was ignored (read as sRGB)
                items = iter_unit(unit, list(cfg.image_extensions), cfg.max_image_bytes,
                                  max_caption_bytes=cfg.max_caption_bytes)
                for item, prepared in _ahead(lambda it: (it, self._prepare(it, unit, stages)), items,
                                             cfg.decode_threads):
                    self._live = (unit.index, inputs, rejects.count)  # before this item: lags by one
                    inputs += 1
                    if isinstance(prepared, Reject):
                        rejects.add(prepared)
                        continue
                    caption, per_stage, ignored = prepared
                    icc_ignored += ignored
                    key = sample_key(item.key, keys)  # here, in order: decode threads finish out of order
                    keys.add(key)
                    for stage, (bucket, pixels, up) in per_stage.items():
                        upscaled[stage] += up
                        group = (stage, bucket)
                        pending.setdefault(group, []).append((key, item.key, pixels, caption))
                        if len(pending[group]) >= cfg.batch_size:
                            flush(group)
                for group in sorted(pending):  # the partial batches, in a fixed order
                    flush(group)
                for stage, shard in shards.items():
                    if inputs != shard.count + rejects.count:
                        raise RuntimeError(f"unit {unit.name} stage {stage}: {inputs} inputs != "
                                           f"{shard.count} written + {rejects.count} rejected")
            # All tars are complete and visible now; the rejects file next, markers last.
            rejects_sha = rejects.publish(mf.rejects_url(root, unit.index))
        markers = {}
        for stage in stages:
            markers[stage] = {"schema": mf.MARKER_SCHEMA, "index": unit.index, "source": unit.name,
                              "fingerprint": self.fingerprint, "decode_version": DECODE_VERSION,
                              "samples": shards[stage].count,
                              "input_version": unit.version,
                              "inputs": inputs, "rejected": rejects.count, "rejects_sha256": rejects_sha,
                              "upscaled": upscaled[stage], "icc_ignored": icc_ignored,
                              "bytes": shards[stage].size, "sha256": shards[stage].sha256}
            storage.write_bytes_atomic(mf.marker_url(root, stage, unit.index), mf.json_bytes(markers[stage]))
        return markers

    def _prepare(self, item: RawSample | Reject, unit: InputUnit, stages: list[str]):
        """Validate + decode one sample: (caption, {stage: (bucket, uint8 HWC, upscaled)}, whether
        its ICC profile was ignored) or a Reject."""
        if isinstance(item, Reject):
            return item
        cfg = self.cfg
        caption, reason, detail = check_caption(item.caption, cfg.max_caption_bytes)
        if caption is None:
            return Reject(item.key, unit.name, reason, detail)
        try:
            # Decoded for all configured stages even when only some are redone: the pixels of a
            # stage must not depend on which other stages happen to be missing.
            crops = load_for_buckets(item.image, list(self.stage_buckets.values()), max_pixels=cfg.max_pixels,
                                     min_side=cfg.min_side, formats=self.formats)
        except ImageRejected as exc:
            return Reject(item.key, unit.name, exc.reason, exc.detail)
        return caption, {s: c for s, c in zip(self.stage_buckets, crops) if s in stages}, crops.icc_ignored


def _ahead(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """fn over items, in order, with up to 2 x `threads` calls running ahead in a thread pool.

    PIL releases the GIL while decoding and resizing, so on GPU actors the next images decode
    while the current batch encodes. Bounded: a shard is never read into memory whole.
    """
    if threads <= 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) > 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
