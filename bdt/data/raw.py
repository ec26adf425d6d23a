"""Raw image-caption webdataset shards (img2dataset layout) -> batches of RGB tensors in [-1, 1].

A sample is KEY.jpg|jpeg|png|webp + optional KEY.txt (caption) + optional KEY.json. Shards are
given as a brace pattern (`data/shapes-{000000..000009}.tar`), a glob, or a comma-separated list,
on a local path or any fsspec URL; they are read with bdt's tar reader (bdt/data/tars.py) inside
the worker process (s3fs is not fork-safe; environment.md).

Split: global worker g = rank * workers + worker_id out of G. With at least G shards each worker
reads its own shards (every epoch in a seeded order); with fewer, every worker reads all shards
and keeps samples k with k % G == g, k counting the epoch's samples across its shards (so small
shards still feed every worker). The stream is endless (epoch after epoch); each batch carries
the worker's read position (epoch, shard cursor, sample offset, samples before the shard,
batches yielded, and which shard list it indexes) after it, and a stream restarted from that
position continues with the next unread sample without decoding the skipped ones; a position
over another shard list is refused. A worker whose shards of an epoch give no usable image goes
on to the next epoch's (another set); only when every shard has failed it does it stop. The
DataLoader takes batches from its workers in turn, always starting at its worker 0; a restarted
stream maps that to the worker whose turn it was, so it delivers the uninterrupted run's batch
sequence. Corrupt samples (undecodable image, missing image, an image member over
MAX_MEMBER_BYTES, left unread; nothing read: '..' paths, links) are skipped, counted and logged
with their key and reason (the first MAX_LOGGED per worker), and so is the rest of a damaged
shard (once, logged). A failed read (I/O, network, the shard gone) is no damage: it is tried
again from the same sample, then stops the stream naming the shard (tar_reads.ReadRetries); a read
that never returns stops it after `stall_s` (the DataLoader's timeout, its stuck workers
killed). A sample with several images uses the first of IMAGE_EXTS; an animated image, its first
frame.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bdt.data.images import decode_rgb, needed_size, open_image, resize_center_crop, to_unit_range
from bdt.data.stream_state import shard_names
from bdt.data.tar_reads import ReadRetries, read_failure
from bdt.data.tars import MAX_MEMBER_BYTES, log_skip, read_samples
from bdt.entry import ignore_stop_signals

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# A worker's position before its first batch ("before": samples of the epoch's earlier shards).
START = {"epoch": 0, "shard": 0, "offset": 0, "before": 0, "corrupt": 0, "batches": 0}
MAX_LOGGED = 20  # rejected samples logged by key per worker; the rest are counted only


@dataclass
class RawDataConfig:
    shards: str = "???"  # brace pattern, glob, folder of .tars or comma list; local or fsspec URL
    size: int = 128  # training resolution (square crops of this size)
    resize: int = 0  # shorter side is resized to this first (0 = size); > size allows crops
    random_crop: bool = False  # crop position random per sample (seeded, resume-exact), else centre
    seed: int = 0  # shard order per epoch and crop positions
    num_workers: int = 1  # DataLoader worker processes per rank (0 = read in the main process)
    # No batch from the workers for this long (a read that never returns: a hung mount, an
    # endpoint that stopped answering) stops the run naming the shards they were on; 0 = wait
    # forever. With num_workers 0 the step itself waits in the read: no limit.
    stall_s: float = 600.0

    def validate(self) -> None:
        """Raise ValueError naming the first bad key (as `data.<key>`)."""
        if self.size < 1:
            raise ValueError(f"data.size must be >= 1, got {self.size}")
        if self.resize != 0 and self.resize < self.size:  # decode_image would crop at `size`
            raise ValueError(f"data.resize must be 0 (= data.size) or >= data.size {self.size}, "
                             f"got {self.resize}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0 = the main process), got "
                             f"{self.num_workers}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"data.seed must be in [0, 2^63), got {self.seed}")
        if not 0 <= self.stall_s <= 1e6:  # the DataLoader's timeout overflows from ~2.1e6 s
            raise ValueError(f"data.stall_s must be a finite number of seconds >= 0 (0 = no "
                             f"limit) and at most 1e6, got {self.stall_s}")


def expand_shards(spec: str) -> list[str]:
    """All shard URLs named by `spec` (a folder names its .tar files); raises ValueError naming
    a pattern that matches nothing, or a missing shard."""
    from bdt import storage, url_listing

    urls: list[str] = []
    for url in url_listing.expand_urls(spec, "data.shards"):
        if not storage.is_dir(url):
            urls.append(url)
            continue
        # The folder's name as it is: `a[1]` as a glob matched `a1` (or nothing).
        tars = url_listing.glob_urls(storage.join(glob.escape(url), "*.tar"))
        if not tars:
            raise ValueError(f"data.shards: the folder {url!r} holds no .tar file")
        urls.extend(tars)
    urls = list(dict.fromkeys(urls))  # a shard named twice (itself and by its folder) is read once
    missing = url_listing.missing_files(urls)
    if not urls or missing:
        raise ValueError(f"data.shards: no shard found for '{spec}'" if not urls else
                         f"data.shards: {len(missing)} shard(s) do not exist, e.g. {missing[0]}")
    return urls


def _ignore_stop_signals(_worker_id: int) -> None:
    """The loader's worker_init_fn (bdt.entry.ignore_stop_signals). Their writes to a hung-up
    terminal go through logging, which drops what fails."""
    ignore_stop_signals()


def decode_image(data: bytes, size: int, resize: int = 0, rng: np.random.Generator | None = None,
                 max_pixels: int = 100_000_000) -> torch.Tensor:
    """Bytes -> [3, size, size] float in [-1, 1] (x / 127.5 - 1).

    The shorter side goes to `resize` (default `size`) with a centre crop to a square, then a
    `size` crop is cut: at a position drawn from `rng` when given, else centred. Decoding policy
    (EXIF, alpha, 16-bit, size guards) is bdt.data.images'; raises ImageRejected.
    """
    resize = max(resize, size)
    img, oriented = open_image(data, max_pixels=max_pixels, min_side=1)
    rgb = decode_rgb(img, oriented, needed_size(oriented, [(resize, resize)]))
    pixels_HWC = resize_center_crop(rgb, (resize, resize))
    if resize > size:
        top, left = (rng.integers(0, resize - size + 1, 2) if rng is not None
                     else ((resize - size) // 2, (resize - size) // 2))
        pixels_HWC = pixels_HWC[top:top + size, left:left + size]
    return torch.from_numpy(to_unit_range(pixels_HWC[None])[0])


class RawImageStream(IterableDataset):
    """Endless stream of batches {"images" [B,3,S,S], "captions", "keys", "worker", "position",
    "corrupt"}."""

    def __init__(self, urls: list[str], size: int, batch_size: int, rank: int, world_size: int,
                 seed: int = 0, positions: dict[int, dict] | None = None, resize: int = 0,
                 random_crop: bool = False):
        self.urls = list(urls)
        self.shard_list = shard_list_id(self.urls)
        self.size = size
        self.resize = resize
        self.random_crop = random_crop
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.positions = positions or {}
        # A position is a shard index into one list: over another list it would read some shards
        # twice and others never (states from before the list was recorded carry no id).
        if any(p.get("shards", self.shard_list) != self.shard_list for p in self.positions.values()):
            raise ValueError(f"data.shards now names {len(self.urls)} shard(s), not the list the "
                             f"checkpoint's stream read: resume with the same shards (or start a "
                             f"new run directory)")
        # Whose turn it is: the total of batches the workers gave, taken in turn (module docstring).
        self.first = sum(p.get("batches", 0) for p in self.positions.values())

    def _plan(self, epoch: int, g: int, total: int) -> tuple[list[str], int]:
        """(this worker's shards for `epoch`, sample stride) — see the module docstring."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        shards = [self.urls[i] for i in order]
        if len(shards) >= total:
            return shards[g::total], 1
        return shards, total

    def reading(self, positions: dict[int, dict], workers: int) -> str:
        """Where each worker was at its last batch taken, in words (for a stall's report: the
        worker reads on ahead of the batches taken, so the stuck read is there or after)."""
        out = []
        for w, pos in sorted(positions.items()):
            shards, _ = self._plan(pos.get("epoch", 0), self.rank * workers + w,
                                   self.world_size * workers)
            at = pos.get("shard", 0)
            url = shards[at] if 0 <= at < len(shards) else "the next epoch's first shard"
            out.append(f"worker {w}: {url} after sample {pos.get('offset', 0)}")
        return "; ".join(out)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (worker + self.first) % workers
        g, total = self.rank * workers + worker, self.world_size * workers
        pos = {**START, **self.positions.get(worker, {}), "shards": self.shard_list}
        images, captions, keys = [], [], []
        usable = pos["shard"] > 0 or pos["offset"] > 0  # a resumed epoch had images before
        failed: set[str] = set()  # the shards of the epochs in a row that gave nothing usable
        retries = ReadRetries(log)
        counted = 0  # samples of nothing readable counted past pos["offset"]: a retry meets them again
        while True:
            shards, stride = self._plan(pos["epoch"], g, total)
            while pos["shard"] < len(shards):
                url = shards[pos["shard"]]
                try:
                    j = -1  # index of the shard's last sample of which something was read
                    met = 0  # samples of nothing readable met past pos["offset"] in this read
                    for tar_sample in read_samples(url, max_bytes=lambda _ext: MAX_MEMBER_BYTES):
                        owner = (pos["before"] + j + 1) % stride == (g if stride > 1 else 0)
                        if not tar_sample.members:  # unsafe path, link, over the size limit
                            met += j + 1 >= pos["offset"] and owner  # not counted before a restart
                            if met > counted:
                                counted = met
                                pos["corrupt"] += 1
                                log_skip(log, pos["corrupt"], MAX_LOGGED, "worker %d: skipping "
                                         "sample %r of %s: nothing readable: %s", g,
                                         tar_sample.key, url, tar_sample.refused)
                            continue
                        j, sample = j + 1, tar_sample.as_dict(url)
                        if j < pos["offset"]:
                            continue  # consumed before the restart: skipped without decoding
                        retries.failed = 0
                        pos["offset"], counted, met = j + 1, 0, 0
                        if not owner:
                            continue
                        # Crop RNG from the sample's place in the stream: reproducible after a resume.
                        rng = (np.random.default_rng([self.seed, pos["epoch"], g, pos["shard"], j])
                               if self.random_crop else None)
                        image, why = self._decode(sample, rng)
                        if image is None:
                            pos["corrupt"] += 1
                            log_skip(log, pos["corrupt"], MAX_LOGGED, "worker %d: skipping "
                                     "sample %r of %s: %s", g, sample["__key__"], url, why)
                            continue
                        images.append(image)
                        usable = True
                        captions.append(sample.get("txt", b"").decode("utf-8", "replace"))
                        keys.append(sample["__key__"])
                        if len(images) == self.batch_size:
                            pos["batches"] += 1
                            yield {"images": torch.stack(images), "captions": captions, "keys": keys,
                                   "worker": worker, "position": dict(pos), "corrupt": pos["corrupt"]}
                            images, captions, keys = [], [], []
                except (tarfile.TarError, OSError) as e:  # one bad shard must not stop training
                    failure = read_failure(e)
                    if failure is not None:  # the same shard again, from the same sample
                        retries.pause(f"{url}: reading from sample {pos['offset']}", failure)
                        continue
                    log.warning("%s: unreadable from sample %d on (%s); skipping its rest", url,
                                pos["offset"], e)
                    pos["corrupt"] += 1
                pos["shard"] += 1
                pos["before"] += pos["offset"]
                pos["offset"], counted = 0, 0
            failed = set() if usable else failed | set(shards)
            # Shard-split epochs give each worker other shards: only when every shard has failed
            # (or a worker reads them all each epoch) would the stream read on without a batch.
            if not usable and (stride > 1 or len(failed) == len(self.urls)):
                raise ValueError(f"worker {g}: {len(failed)} shard(s) (e.g. {shards[0]}) gave "
                                 f"no usable image ({pos['corrupt']} rejected: a shard list of "
                                 f"corrupt or too few images?)")
            if not usable:
                log.warning("worker %d: epoch %d's %d shard(s) gave no usable image; going on to "
                            "the next epoch's", g, pos["epoch"], len(shards))
            pos["epoch"] += 1
            pos["shard"] = pos["before"] = 0
            usable = False

    def _decode(self, sample: dict[str, Any], rng: np.random.Generator | None
                ) -> tuple[torch.Tensor | None, str]:
        """(the image, "") or (None, why it was rejected)."""
        data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if data is None:
            return None, f"no image member (has {sorted(k for k in sample if not k.startswith('__'))})"
        try:
            return decode_image(data, self.size, self.resize, rng), ""
        except Exception as e:  # noqa: BLE001 - ImageRejected (corrupt, too large, ...): skip, count
            return None, f"{type(e).__name__}: {e}"[:200]


def shard_list_id(urls: list[str]) -> str:
    """What a saved position indexes: the shard list, in order, local shards by real path (the
    same files named otherwise are the same list; stream_state.shard_names)."""
    return hashlib.sha256(json.dumps(shard_names(urls)).encode()).hexdigest()[:16]


class StreamState:
    """Tracks, in the training process, each worker's position after the last consumed batch."""

    def __init__(self, positions: dict[int, dict] | None = None,
                 reading: Callable[[dict[int, dict]], str] = lambda _: "unknown"):
        self.positions = {int(k): dict(v) for k, v in (positions or {}).items()}
        self.reading = reading  # the positions in words (RawImageStream.reading)

    def update(self, batch: dict[str, Any]) -> None:
        self.positions[int(batch["worker"])] = dict(batch["position"])

    def take(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """next(batches), its position recorded. The DataLoader's timeout (data.stall_s) is
        raised as a TimeoutError that says where the workers were; a worker's error as itself,
        without the worker's traceback the DataLoader writes into its message."""
        try:
            batch = next(batches)
        except Exception as e:
            own = _worker_error(e)
            if own is not None:
                # The loader keeps its workers serving, and they ignore SIGTERM
                # (_ignore_stop_signals): this process's exit joined them forever.
                shutdown = getattr(batches, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()  # idle ones stop at once; then no SIGCHLD check of theirs is left
                for worker in getattr(batches, "_workers", ()):
                    worker.kill()
                raise own from e
            if not str(e).startswith("DataLoader timed out"):
                raise
            # One stuck in a read never sees the loader's stop either: left alone, it kept this
            # process from exiting. The loader's SIGCHLD check of them goes first, or their
            # death raises "worker killed by signal" wherever this process then is.
            _stop_checking_workers(batches)
            for worker in getattr(batches, "_workers", ()):
                worker.kill()
            raise TimeoutError(f"{e}: no batch from the data workers, a read that does not "
                               f"return (a hung mount, a storage endpoint that stopped "
                               f"answering)? At or after, as of the last batches taken: "
                               f"{self.reading(self.positions)}. Stopping: a resume continues "
                               f"from the last checkpoint (data.stall_s sets the limit, 0 = no "
                               f"limit)") from e
        self.update(batch)
        return batch

    @property
    def corrupt(self) -> int:
        return sum(p.get("corrupt", 0) for p in self.positions.values())

    def to_dict(self) -> dict:
        return {str(k): v for k, v in self.positions.items()}


def _stop_checking_workers(batches: Iterator[dict[str, Any]]) -> None:
    """Take a DataLoader iterator's workers out of its SIGCHLD check (torch's private registry,
    which its own shutdown clears the same way)."""
    if getattr(batches, "_worker_pids_set", False):
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False


def _worker_error(e: Exception) -> Exception | None:
    """A data worker's error with the message it had (None when `e` is no such error): the
    DataLoader raises it again as "Caught <type> in DataLoader worker process N.\nOriginal
    Traceback ...", ending in the worker's "<type>: <message>" line (bdt's are one line)."""
    text = str(e)
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return None
    message = text.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
    try:
        return type(e)(message)
    except (KeyError, TypeError):  # a type that takes other arguments
        return None


def make_loader(cfg: RawDataConfig, batch_size: int, rank: int, world_size: int,
                state: dict | None = None) -> tuple[DataLoader, StreamState]:
    """A DataLoader over this rank's part of the shards, resumed from `state` when given."""
    workers = max(1, cfg.num_workers)
    # Every worker from the start: a checkpoint taken before some worker's first batch still
    # records how many workers the stream was split into.
    urls = expand_shards(cfg.shards)
    positions = ({int(k): v for k, v in state.items()} if state
                 else {w: {**START, "shards": shard_list_id(urls)} for w in range(workers)})
    if positions and set(positions) != set(range(workers)):
        raise ValueError(f"data.num_workers: the checkpoint's stream state has {len(positions)} "
                         f"worker(s), this run has {workers}; resume with the same number")
    stream = RawImageStream(urls, cfg.size, batch_size, rank, world_size,
                            cfg.seed, positions, cfg.resize, cfg.random_crop)
    # Its own generator for the workers' seeds: drawing them from the global RNG (restored by a
    # resume, then drawn again) would shift every later random draw of the training step.
    loader = DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                        prefetch_factor=2 if cfg.num_workers > 0 else None,
                        persistent_workers=False, generator=torch.Generator().manual_seed(cfg.seed),
                        worker_init_fn=_ignore_stop_signals,
                        timeout=cfg.stall_s if cfg.num_workers > 0 else 0)
    return loader, StreamState(positions, lambda now: stream.reading(now, workers))
