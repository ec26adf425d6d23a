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

import glob
import json
import posixpath
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bdt import storage, url_listing
from bdt.data.tar_headers import unsafe_path

INDEX_NAME = "index.json"  # bdt/extract/manifest.py writes the manifest under this name
PLAN_NAME = "plan.json"  # written by an extraction before any shard
REJECTS_NAME = "rejects.jsonl"  # the extraction's rejected inputs, one JSON object a line


class EmptyRemoteListing(ValueError):
    """A remote source (s3://, any fsspec URL) listed no shards. An object store's listing can
    briefly come back short, so a restart may find them (bdt.cluster.launch_checks retries
    this); a local path with no shards is a plain ValueError, an input error."""


def _listed_nothing(source: str, message: str) -> ValueError:
    return EmptyRemoteListing(message) if storage.is_remote(source) else ValueError(message)


@dataclass
class ShardList:
    urls: list[str]
    manifest: dict | None  # the extraction manifest when the data came from one
    source: str
    grids: list[tuple[int, int]] = field(default_factory=list)  # (h, w) tokens, where known
    samples: dict[str, int] = field(default_factory=dict)  # url -> its manifest's sample count


def _regular_files(paths: list[str]) -> list[str]:
    """Shards that are all regular files (through links), else a ValueError naming one: the
    stream would block forever opening a FIFO a glob matched, and fail on a folder (an S3
    prefix a glob matched, `<root>/x.tar/`, it read as a damaged shard, skipped every epoch)."""
    sizes = url_listing.file_sizes(paths)
    odd = [p for p in paths if sizes[p] is None]
    if odd:
        raise ValueError(f"shards: {odd[0]} is not a regular file (a FIFO, device, folder or "
                         f"broken link; {len(odd)} of the {len(paths)} shards are not): remove "
                         f"it or narrow the pattern")
    return paths


def list_shards(source: str, family: str = "", allow_incomplete: bool = False) -> ShardList:
    """Shard URLs of one stage; ValueError naming the source when nothing usable is there (or an
    unfinished extraction, unless `allow_incomplete`), or when `family` is named for shards
    without a manifest."""
    shards = _list_shards(source, family, allow_incomplete)
    if family and shards.manifest is None:
        # Only a manifest says which shards hold a family: ignoring the name would train every
        # stage of `shards: ${data.root}` on all families of a hand-made folder.
        raise ValueError(f"family {family!r} picks a family of an extraction output, but "
                         f"{shards.source!r} has no {INDEX_NAME}: all its shards would be read, "
                         f"whatever family their samples hold; point shards at that family's "
                         f"shards and set family to ''")
    return shards


def _list_shards(source: str, family: str, allow_incomplete: bool) -> ShardList:
    source = source.rstrip("/")
    if not source:
        raise ValueError("data source is empty: set the stage's `shards` to a token-shard "
                         "directory, glob, .tar file or extraction output")
    pattern = any(c in source for c in "*?[")
    if pattern:
        urls = url_listing.glob_urls(source, "listing")
        # A pattern matching nothing, or only itself, is a name: a folder `run[1]` was refused
        # as "matches no file", one named `what?` as "not a regular file".
        itself = [storage.filesystem(u)[1] for u in urls] == [storage.filesystem(source)[1]]
        if urls and not itself:
            return ShardList(_regular_files(urls), None, source)
    if not storage.exists(source, "listing shards in"):
        message = (f"shards: the pattern {source!r} matches no file" if pattern else
                   f"shards: {source!r} does not exist")
        # An object store's folder is a listing; a named .tar is one object, missing for good.
        raise ValueError(message) if source.endswith(".tar") and not pattern else \
            _listed_nothing(source, message)
    if source.endswith(".tar"):
        return ShardList(_regular_files([source]), None, source)
    index_url = storage.join(source, INDEX_NAME)
    if storage.exists(index_url, "reading"):
        manifest = _read_manifest(index_url)
        if manifest.get("complete") is False and not allow_incomplete:
            raise ValueError(_incomplete(index_url, manifest))
        stages = manifest.get("stages", {})
        if not family:
            if len(stages) != 1:
                raise ValueError(f"{index_url} holds the families {sorted(stages)}: name one with "
                                 f"the stage's `family`")
            family = next(iter(stages))
        if family not in stages:
            raise ValueError(f"{index_url} has no family {family!r} (it has {sorted(stages)})")
        entries = _shard_entries(index_url, stages[family], family)
        _check_counts(index_url, manifest, family, entries)
        if not entries:
            raise ValueError(f"{index_url}: family {family!r} lists no shards")
        urls = [storage.join(source, e["shard"]) for e in entries]
        _check_sizes(index_url, family, urls, entries, source)
        return ShardList(urls, manifest, source, samples={
            u: e["samples"] for u, e in zip(urls, entries) if e.get("samples") is not None})
    if storage.exists(storage.join(source, PLAN_NAME)):
        raise ValueError(f"{source} is an extraction output without {INDEX_NAME}: the extraction is "
                         f"still running or was stopped; rerun it to completion")
    urls = _regular_files(url_listing.glob_urls(storage.join(glob.escape(source), "*.tar"),
                                                "listing"))
    if not urls:
        raise _listed_nothing(source, f"shards: {source!r} holds no .tar files and no "
                                      f"{INDEX_NAME}")
    return ShardList(urls, None, source)


def check_rank_split(shards: ShardList, world: int, where: str) -> None:
    """ValueError when a rank's share of the shards (stream_state.rank_split: whole shards, or
    with fewer shards than ranks the samples whose index in a shard % world == rank) holds no
    sample by the manifest's counts. An extraction writes a shard per input unit, empty where
    every input was rejected; a rank given no sample stopped the job at its first step, the
    other ranks failing in a collective."""
    # Here, not at the top: stream_state loads torch, and the cluster wrapper lists shards
    # (launch_checks) without it.
    from bdt.data.stream_state import rank_split

    for rank in range(world):
        mine, stride = rank_split(shards.urls, rank, world)
        phase = rank % stride
        if mine and all(u in shards.samples and shards.samples[u] <= phase for u in mine):
            full = sum(1 for u in shards.urls if shards.samples.get(u) != 0)
            raise ValueError(f"{where}: on {world} ranks, rank {rank}'s share of the "
                             f"{len(shards.urls)} shards {shards.source}/{INDEX_NAME} lists holds "
                             f"no sample by their counts ({full} shard(s) hold any, "
                             f"{sum(shards.samples.values())} samples in all): run on another "
                             f"number of ranks")


def _read_manifest(url: str) -> dict:
    try:
        manifest = json.loads(storage.read_bytes(url, "reading"))
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past the parser
        raise ValueError(f"{url} is damaged ({type(e).__name__}: {str(e)[:200]}): rerun the "
                         f"extraction to rewrite it") from None
    if not isinstance(manifest, dict) or not all(
            isinstance(manifest.get(k, {}), dict) for k in ("stages", "summary", "tokenizer")):
        raise ValueError(f"{url} is damaged (not an extraction manifest): rerun the extraction "
                         f"to rewrite it")
    return manifest


def _shard_entries(index_url: str, entry: object, family: str) -> list[dict]:
    """The shard entries a manifest lists for a family; a path that is not inside its root
    (absolute, '..', a URL, the root itself), a shard listed twice (its samples would count
    double), a size that is not a count or a sha256 that is not a string is refused: a manifest
    names shards of its own output only, once each. `bytes` and `sha256` may be absent (a
    manifest not written by bdt)."""
    try:
        entries = [dict(s) for s in entry["shards"]]
        names = [s["shard"] for s in entries]
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{index_url} is damaged: no shard list for family {family!r} "
                         f"({type(e).__name__}: {e})") from None
    seen: dict[str, str] = {}
    for name, e in zip(names, entries):
        # A URL ("s3://other-bucket/x.tar") would be joined under the root as a path: refused.
        if not isinstance(name, str) or unsafe_path(name) or "://" in name or \
                posixpath.normpath(name) == ".":
            raise ValueError(f"{index_url} is damaged: family {family!r} lists the shard "
                             f"{name!r}, not a path inside the output")
        key = posixpath.normpath(name)
        if key in seen:
            also = f" (also as {seen[key]!r})" if seen[key] != name else ""
            raise ValueError(f"{index_url} is damaged: family {family!r} lists the shard "
                             f"{name!r} twice{also}")
        seen[key] = name
        size = e.get("bytes")
        if size is not None and (type(size) is not int or size < 0):
            raise ValueError(f"{index_url} is damaged: shard {name!r} has 'bytes' {size!r}, "
                             f"not a byte count")
        if e.get("sha256") is not None and not isinstance(e["sha256"], str):
            raise ValueError(f"{index_url} is damaged: shard {name!r} has 'sha256' "
                             f"{e['sha256']!r}, not a hex digest")
    return entries


_COUNTS = ("inputs", "samples", "rejected")


def _check_counts(index_url: str, manifest: dict, family: str, entries: list[dict]) -> None:
    """A family's counts must add up as an extraction writes them (inputs = samples + rejected
    per shard, totals = the shards' sums) and a complete manifest lists one shard per input
    unit: an entry removed or added by hand would train on a part of the data, or on data
    twice, while every listed shard still matches its hash. Counts a manifest lacks (one not
    written by bdt) are not checked."""
    for e in entries:
        for key in _COUNTS:
            if e.get(key) is not None and (type(e[key]) is not int or e[key] < 0):
                raise ValueError(f"{index_url} is damaged: shard {e['shard']!r} has {key!r} "
                                 f"{e[key]!r}, not a count")
        counts = [e.get(k) for k in _COUNTS]
        if None not in counts and counts[0] != counts[1] + counts[2]:
            raise ValueError(f"{index_url} is damaged: shard {e['shard']!r} lists inputs {counts[0]}, "
                             f"samples {counts[1]} and rejected {counts[2]}, which do not add up")
    totals = manifest["stages"][family].get("totals")  # _shard_entries read the family as an object
    for key in (*_COUNTS, "bytes"):
        if not isinstance(totals, dict) or key not in totals or any(e.get(key) is None for e in entries):
            continue
        if totals[key] != sum(e[key] for e in entries):
            raise ValueError(f"{index_url} is damaged: family {family!r} totals {key} {totals[key]!r}, "
                             f"its shards add up to {sum(e[key] for e in entries)}")
    units = (manifest.get("summary") or {}).get("units")
    if manifest.get("complete") is True and type(units) is int and len(entries) != units:
        raise ValueError(f"{index_url} is damaged: it says complete, with {units} input unit(s), "
                         f"but family {family!r} lists {len(entries)} shard(s)")


def _check_sizes(index_url: str, family: str, urls: list[str], entries: list[dict],
                 source: str) -> None:
    """Every listed shard exists with the size its entry records: one listing per folder (also
    on S3), so it runs at every start; a shard truncated, replaced or edited after extraction is
    refused before training. `bdt data verify` compares the sha256 too."""
    sizes = url_listing.file_sizes(urls)
    missing = [u for u in urls if sizes[u] is None]
    if missing:
        raise ValueError(f"{index_url} lists {len(missing)} shard(s) of family {family!r} that "
                         f"do not exist, e.g. {missing[0]}: restore them or rerun the extraction")
    wrong = [(u, e["bytes"], sizes[u]) for u, e in zip(urls, entries)
             if e.get("bytes") is not None and sizes[u] != e["bytes"]]
    if wrong:
        url, want, have = wrong[0]
        raise ValueError(f"{index_url}: {len(wrong)} shard(s) of family {family!r} differ in size "
                         f"from the manifest, e.g. {url}: {want} bytes listed, {have} found "
                         f"(truncated, replaced or edited after extraction): restore them or "
                         f"rerun the extraction (`bdt data verify {source}` checks every sha256)")


def verify(source: str, families: list[str] | None = None, workers: int = 8,
           on_shard: Callable[[], None] | None = None) -> tuple[int, list[str]]:
    """(shards checked, problems): every shard an extraction manifest lists (all families, or
    `families`) read whole and compared with its entry's size and sha256, and rejects.jsonl
    with the manifest's reject count. ValueError when
    `source` holds no readable manifest, lacks a family, lists no shard or one shard in two
    families. `on_shard` is called per shard."""
    source = source.rstrip("/")
    if not source:
        raise ValueError("no extraction output given (an empty path)")
    families = list(dict.fromkeys(families or []))  # a family named twice is checked once
    index_url = storage.join(source, INDEX_NAME)
    if not storage.exists(index_url):
        raise ValueError(f"{source} holds no {INDEX_NAME}: verify checks an extraction output")
    manifest = _read_manifest(index_url)
    stages = manifest.get("stages", {})
    unknown = sorted(set(families or []) - set(stages))
    if unknown:
        raise ValueError(f"{index_url} has no family {unknown[0]!r} (it has {sorted(stages)})")
    listed, family_of = [], {}
    for family in families or sorted(stages):
        entries = _shard_entries(index_url, stages[family], family)
        _check_counts(index_url, manifest, family, entries)
        for e in entries:
            other = family_of.setdefault(posixpath.normpath(e["shard"]), family)
            if other != family:
                raise ValueError(f"{index_url} is damaged: the shard {e['shard']!r} is listed by "
                                 f"the families {other!r} and {family!r}")
            listed.append((storage.join(source, e["shard"]), e))
    if not listed:
        raise ValueError(f"{index_url} lists no shards: nothing to verify")
    sizes = url_listing.file_sizes([u for u, _ in listed])

    def check(item: tuple[str, dict]) -> str | None:
        url, entry = item
        want_size, want_sha = entry.get("bytes"), entry.get("sha256")
        try:
            if sizes[url] is None:
                return f"{url}: missing, or not a file"
            if want_size is not None and sizes[url] != want_size:
                return f"{url}: {sizes[url]} bytes, the manifest lists {want_size}"
            if want_sha is None:
                return f"{url}: the manifest records no sha256 for it"
            sha, _ = storage.sha256(url)
            if sha != want_sha:
                return f"{url}: sha256 {sha}, the manifest lists {want_sha}"
            return None
        except OSError as e:  # gone or unreadable meanwhile
            return f"{url}: unreadable ({type(e).__name__}: {e})"
        finally:
            if on_shard is not None:
                on_shard()

    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashing and reads release the GIL
        problems = [p for p in pool.map(check, listed) if p is not None]
    totals = stages[families[0] if families else sorted(stages)[0]].get("totals")
    problems.append(_check_rejects(storage.join(source, REJECTS_NAME),
                                   totals.get("rejected") if isinstance(totals, dict) else None))
    if manifest.get("complete") is False:  # every listed shard may match: still not all there
        problems.append(_incomplete(index_url, manifest))
    return len(listed), [p for p in problems if p is not None]


def _incomplete(index_url: str, manifest: dict) -> str:
    failed = (manifest.get("summary") or {}).get("failed_units")
    names = sorted(failed)[:5] if isinstance(failed, dict) else []
    return (f"{index_url} says the extraction is incomplete (complete: false; failed input units "
            f"{names}): rerun the extraction to finish it, or set the stage's allow_incomplete: "
            f"true to train on its complete shards only")


def _check_rejects(url: str, counted: object) -> str | None:
    """The problem with rejects.jsonl, if any: one reject record a line, as many as the manifest
    counts (`counted`: a family's total; the families share their units' rejects)."""
    if type(counted) is not int:
        return None  # a manifest not written by bdt
    fs, path = storage.filesystem(url)
    lines = 0
    try:
        with fs.open(path, "rb") as f:
            for lines, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past the parser
                    record = None
                if not isinstance(record, dict) or not isinstance(record.get("reason"), str):
                    return f"{url}: line {lines} is not a reject record"
    except FileNotFoundError:
        if counted:
            return f"{url}: missing, the manifest counts {counted} reject(s)"
    except OSError as e:
        return f"{url}: unreadable ({type(e).__name__}: {e})"
    if lines != counted:
        return f"{url}: {lines} reject(s), the manifest counts {counted}"
    return None


def tokenizer_sha(manifest: dict | None) -> dict[str, str] | None:
    """The per-file sha256 of the image tokenizer that wrote a manifest's shards."""
    if manifest is None:
        return None
    return (manifest.get("tokenizer") or {}).get("sha256")
