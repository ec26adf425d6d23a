"""Where a training stage's token shards are, and reading one shard from a byte offset.

A stage names its data as one of:
  * an extraction output root holding `index.json` (bdt/extract/manifest.py) + a family name:
    the shard list and the image tokenizer's identity come from the manifest. A manifest with
    `complete: false` (some input units failed) or a root with `plan.json` but no manifest yet
    (an extraction still running or killed) is refused unless `allow_incomplete` is set: training
    on part of a dataset by accident skews it silently, while a user who knows that a few units
    can never be made (lost raw objects) can still train on every shard that is complete;
  * a directory of `*.tar` token shards, a glob (`.../*.tar`), or a single `.tar` file.
Local paths and fsspec URLs (s3://...) alike.

Reading one shard is bdt.data.tars.iter_shard (with byte offsets for an exact resume).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from bdt import storage
from bdt.data.tars import unsafe_path

INDEX_NAME = "index.json"  # bdt/extract/manifest.py writes the manifest under this name
PLAN_NAME = "plan.json"  # written by an extraction before any shard


@dataclass
class ShardList:
    urls: list[str]
    manifest: dict | None  # the extraction manifest when the data came from one
    source: str


def _glob(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    fs.invalidate_cache()
    found = sorted(fs.glob(path))
    if storage.is_remote(url):
        proto = url.split("://", 1)[0]
        return [f"{proto}://{p}" for p in found]
    return found


def list_shards(source: str, family: str = "", allow_incomplete: bool = False) -> ShardList:
    """Shard URLs of one stage; ValueError naming the source when nothing usable is there (or an
    unfinished extraction, unless `allow_incomplete`)."""
    source = source.rstrip("/")
    if not source:
        raise ValueError("data source is empty: set the stage's `shards` to a token-shard "
                         "directory, glob, .tar file or extraction output")
    if any(c in source for c in "*?["):
        urls = _glob(source)
        if not urls:
            raise ValueError(f"shards: the pattern {source!r} matches no file")
        return ShardList(urls, None, source)
    if not storage.exists(source):
        raise ValueError(f"shards: {source!r} does not exist")
    if source.endswith(".tar"):
        return ShardList([source], None, source)
    index_url = storage.join(source, INDEX_NAME)
    if storage.exists(index_url):
        manifest = _read_manifest(index_url)
        if manifest.get("complete") is False and not allow_incomplete:
            failed = sorted((manifest.get("summary") or {}).get("failed_units", {}))
            raise ValueError(f"{index_url} says the extraction is incomplete (complete: false; failed "
                             f"input units {failed[:5]}): rerun the extraction to finish it, or set the "
                             f"stage's allow_incomplete: true to train on its complete shards only")
        stages = manifest.get("stages", {})
        if not family:
            if len(stages) != 1:
                raise ValueError(f"{index_url} holds the families {sorted(stages)}: name one with "
                                 f"the stage's `family`")
            family = next(iter(stages))
        if family not in stages:
            raise ValueError(f"{index_url} has no family {family!r} (it has {sorted(stages)})")
        urls = [storage.join(source, name) for name in _shard_names(index_url, stages[family], family)]
        if not urls:
            raise ValueError(f"{index_url}: family {family!r} lists no shards")
        missing = storage.missing_files(urls)
        if missing:
            raise ValueError(f"{index_url} lists {len(missing)} shard(s) of family {family!r} that "
                             f"do not exist, e.g. {missing[0]}: restore them or rerun the extraction")
        return ShardList(urls, manifest, source)
    if storage.exists(storage.join(source, PLAN_NAME)):
        raise ValueError(f"{source} is an extraction output without {INDEX_NAME}: the extraction is "
                         f"still running or was stopped; rerun it to completion")
    urls = _glob(storage.join(source, "*.tar"))
    if not urls:
        raise ValueError(f"shards: {source!r} holds no .tar files and no {INDEX_NAME}")
    return ShardList(urls, None, source)


def _read_manifest(url: str) -> dict:
    try:
        manifest = json.loads(storage.read_bytes(url))
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{url} is damaged ({e}): rerun the extraction to rewrite it") from None
    if not isinstance(manifest, dict) or not all(
            isinstance(manifest.get(k) or {}, dict) for k in ("stages", "summary", "tokenizer")):
        raise ValueError(f"{url} is damaged (not an extraction manifest): rerun the extraction "
                         f"to rewrite it")
    return manifest


def _shard_names(index_url: str, entry: object, family: str) -> list[str]:
    """The shard paths a manifest lists for a family, relative to its root; a path that is not
    (absolute, '..') is refused: a manifest names shards of its own output only."""
    try:
        names = [s["shard"] for s in entry["shards"]]
    except (TypeError, KeyError) as e:
        raise ValueError(f"{index_url} is damaged: no shard list for family {family!r} "
                         f"({type(e).__name__}: {e})") from None
    for name in names:
        if not isinstance(name, str) or not name or unsafe_path(name):
            raise ValueError(f"{index_url} is damaged: family {family!r} lists the shard "
                             f"{name!r}, not a path inside the output")
    return names


def tokenizer_sha(manifest: dict | None) -> dict[str, str] | None:
    """The per-file sha256 of the image tokenizer that wrote a manifest's shards."""
    if manifest is None:
        return None
    return (manifest.get("tokenizer") or {}).get("sha256")
