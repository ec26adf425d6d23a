"""Write the shapes dataset as img2dataset-style webdataset shards, locally or to an fsspec URL.

Layout of `out`: shapes-000000.tar, shapes-000001.tar, ... (each `KEY.jpg|png`, `KEY.txt`,
`KEY.json`), then config.yaml, then manifest.json. A shard appears only once complete
(bdt.data.shard_writer.ShardWriter) and the manifest is written last, so a directory with a manifest is a
finished dataset and one without is not.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import posixpath
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict

from tqdm import tqdm

from bdt import storage
from bdt.config import save_resolved
from bdt.data.shapes import ShapesConfig, make_sample, parse_size
from bdt.data.shard_writer import ShardWriter
from bdt.processes import exit_with_parent

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shapes-{:06d}.tar"


def validate(cfg: ShapesConfig) -> list[tuple[int, int]]:
    """Check every option before any work; returns the parsed sizes. Raises ValueError."""
    if not cfg.out.strip():  # storage.join would put the shards at the filesystem's root
        raise ValueError("--out is empty: name the dataset's directory")
    if cfg.num <= 0:
        raise ValueError(f"--num must be a positive number of samples, got {cfg.num}")
    if cfg.per_shard <= 0:
        raise ValueError(f"--per-shard must be positive, got {cfg.per_shard}")
    if cfg.format not in ("jpg", "png"):
        raise ValueError(f"--format must be jpg or png, got '{cfg.format}'")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {cfg.jpeg_quality}")
    if cfg.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.seed < 0:  # numpy seeds are non-negative
        raise ValueError(f"--seed must be >= 0, got {cfg.seed}")
    if not cfg.sizes:
        raise ValueError("--size needs at least one S or WxH value")
    return [parse_size(s) for s in cfg.sizes]


def encode_sample(cfg: ShapesConfig, index: int, sizes: list[tuple[int, int]]) -> dict:
    """One webdataset sample (already bytes) for dataset position `index`."""
    image, text, meta = make_sample(cfg.seed, index, sizes)
    buf = io.BytesIO()
    if cfg.format == "jpg":
        # 4:4:4 keeps colour edges of small objects crisp (4:2:0 halves chroma resolution).
        image.save(buf, "JPEG", quality=cfg.jpeg_quality, subsampling=0)
    else:
        image.save(buf, "PNG")
    return {"__key__": f"{index:09d}", cfg.format: buf.getvalue(), "txt": text.encode(),
            "json": json.dumps(meta, sort_keys=True).encode()}


def shard_range(cfg: ShapesConfig, shard: int) -> range:
    return range(shard * cfg.per_shard, min(cfg.num, (shard + 1) * cfg.per_shard))


def write_shard(cfg: ShapesConfig, shard: int, progress: tqdm | None = None) -> dict:
    """Render and write shard number `shard`; returns its manifest entry."""
    sizes = validate(cfg)
    name = SHARD_PATTERN.format(shard)
    with ShardWriter(storage.join(cfg.out, name)) as tar:
        for index in shard_range(cfg, shard):
            tar.write(encode_sample(cfg, index, sizes))
            if progress is not None:
                progress.update(1)
    return {"name": name, "count": tar.count, "first_index": shard_range(cfg, shard).start,
            "sha256": tar.sha256}


def _write_shard_in_worker(cfg_dict: dict, shard: int) -> dict:
    # Runs in a spawned process: it builds its own filesystem objects (s3fs is not fork-safe).
    return write_shard(ShapesConfig(**cfg_dict), shard)


def _remove_shards_from(out: str, first: int) -> None:
    """Shards numbered `first` and up, left by an earlier run of more shards: a glob over the
    folder (the documented `shapes-*.tar`) would read them beside this run's."""
    fs, root = storage.filesystem(out)
    for path in fs.glob(posixpath.join(root, "shapes-*.tar")):
        number = re.fullmatch(r"shapes-(\d+)\.tar", posixpath.basename(path))
        if number and int(number.group(1)) >= first:
            log.info("removing %s, a shard of an earlier run (this one writes %d)", path, first)
            fs.rm(path)


def generate(cfg: ShapesConfig) -> dict:
    """Write the whole dataset described by `cfg`; returns the manifest."""
    validate(cfg)
    storage.check_writable(cfg.out)  # fail before rendering anything
    manifest_url = storage.join(cfg.out, MANIFEST_NAME)
    if storage.exists(manifest_url):  # rewriting a finished dataset: unfinished until the end
        fs, path = storage.filesystem(manifest_url)
        fs.rm(path)
    num_shards = -(-cfg.num // cfg.per_shard)
    _remove_shards_from(cfg.out, num_shards)
    entries: list[dict] = [{}] * num_shards
    with tqdm(total=cfg.num, desc=f"shapes -> {cfg.out}", unit="img") as progress:
        if cfg.workers == 1:
            for shard in range(num_shards):
                entries[shard] = write_shard(cfg, shard, progress)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(cfg.workers, num_shards), mp_context=ctx,
                                     initializer=exit_with_parent) as pool:
                jobs = {pool.submit(_write_shard_in_worker, asdict(cfg), shard): shard
                        for shard in range(num_shards)}
                try:
                    for job in as_completed(jobs):
                        entries[jobs[job]] = job.result()
                        progress.update(entries[jobs[job]]["count"])
                except BaseException:  # one shard failed: don't start the others
                    pool.shutdown(cancel_futures=True)
                    raise
    save_resolved(cfg, cfg.out)
    manifest = {"dataset": "shapes", "num_samples": cfg.num, "seed": cfg.seed,
                "format": cfg.format, "sizes": list(cfg.sizes), "shards": entries}
    storage.write_bytes_atomic(manifest_url,
                               json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest
