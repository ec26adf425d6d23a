"""Output layout, done-markers, rejects files and the manifest (index.json) of an extraction run.

  OUTPUT/plan.json                  the shard plan: input unit i -> output shard i of each stage
  OUTPUT/<stage>/<i:06d>.tar        token shard (bdt/data/token_shards.py)
  OUTPUT/<stage>/<i:06d>.done.json  marker, written LAST: counts, bytes, sha256 of the shard
  OUTPUT/rejects/<i:06d>.jsonl      rejected inputs of unit i (key, source, reason, detail)
  OUTPUT/rejects.jsonl              all rejects, merged at the end of a run
  OUTPUT/index.json                 manifest: tokenizer identity, config, per-shard entries, totals
  OUTPUT/config.yaml                the resolved config
  OUTPUT/lock.json                  held by the run writing the output (host, pid), removed at its end
                                    (with the output folder when the run made it and left it empty)

A shard counts as done only when its marker parses, was made with the same fingerprint
(tokenizer + preprocessing settings) and the shard's size and sha256 match the marker. A rerun
refuses an output whose markers name another fingerprint, another image decoding version
(bdt/data/images.py DECODE_VERSION; a marker without one: 1), or an input version (size and
mtime or ETag) other than the input's now.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from typing import Any, NoReturn

import psutil

from bdt import storage
from bdt.config import RESOLVED_CONFIG_NAME
from bdt.data.images import DECODE_VERSION
from bdt.data.token_shards import SCHEMA_VERSION as TOKEN_SHARD_SCHEMA
from bdt.extract.input_units import InputUnit, resolved_url
from bdt.training.run_lock import holder_alive

MARKER_SCHEMA = 1
PLAN_SCHEMA = 2  # its sources resolved (input_units.resolved_url); a plan without one: as spelled
INDEX_NAME = "index.json"
PLAN_NAME = "plan.json"
REJECTS_NAME = "rejects.jsonl"
LOCK_NAME = "lock.json"
REJECTS_DIR = "rejects"
# The output's own entries: a stage (family) directory of one of these names would clash.
RESERVED_NAMES = (INDEX_NAME, PLAN_NAME, REJECTS_NAME, LOCK_NAME, RESOLVED_CONFIG_NAME, REJECTS_DIR)


def shard_url(root: str, stage: str, index: int) -> str:
    return storage.join(root, stage, f"{index:06d}.tar")


def marker_url(root: str, stage: str, index: int) -> str:
    return storage.join(root, stage, f"{index:06d}.done.json")


def rejects_url(root: str, index: int) -> str:
    return storage.join(root, REJECTS_DIR, f"{index:06d}.jsonl")


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def read_json(url: str) -> Any | None:
    """Parsed JSON, or None when the file is absent or unreadable (a partial write)."""
    try:
        return json.loads(storage.read_bytes(url))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def fingerprint(parts: dict[str, Any]) -> str:
    """Stable hash of everything that changes what a shard contains."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def valid_marker(root: str, stage: str, unit: InputUnit, fp: str) -> dict | None:
    """The marker if the shard it describes is complete and was made from `unit` with fingerprint `fp`.

    Raises ValueError when a valid-looking marker belongs to another configuration or source:
    mixing two tokenizers in one output family must never happen silently. A marker whose
    index or counts disagree (edited by hand) describes no shard: the unit is redone.
    """
    index = unit.index
    marker = read_json(marker_url(root, stage, index))
    if not isinstance(marker, dict) or marker.get("schema") != MARKER_SCHEMA:
        return None
    source = marker.get("source")
    if marker.get("fingerprint") != fp or not (isinstance(source, str) and unit.named_by(source)):
        raise ValueError(
            f"{marker_url(root, stage, index)} was written from source {source} with "
            f"fingerprint {marker.get('fingerprint')}, this run has {unit.name} / {fp} (tokenizer, buckets "
            f"or preprocessing changed): write to a new output directory")
    counts = [marker.get(k) for k in ("inputs", "samples", "rejected")]
    if marker.get("index") != index or not all(type(c) is int and c >= 0 for c in counts) \
            or counts[0] != counts[1] + counts[2]:
        return None
    try:
        sha, size = storage.sha256(shard_url(root, stage, index))
        if marker.get("rejected"):
            rsha, _ = storage.sha256(rejects_url(root, index))
            if rsha != marker.get("rejects_sha256"):
                return None
    except FileNotFoundError:
        return None
    if sha != marker.get("sha256") or size != marker.get("bytes"):
        return None
    return marker


def remove_stale_root_temps(root: str) -> None:
    """Drop what a run killed while writing the output's own files (plan.json, config.yaml,
    index.json, rejects.jsonl: their temp files) or probing it (storage.check_writable's probe
    and its temp) left behind. Call it holding the output lock, after this run's own probe:
    no live writer then, and no later write would ever remove them."""
    for name in (PLAN_NAME, RESOLVED_CONFIG_NAME, INDEX_NAME, REJECTS_NAME):
        storage.remove_stale_temps(storage.join(root, name))
    fs, path = storage.filesystem(root)
    for pattern in (storage.WRITE_PROBE_PREFIX + "*", "." + storage.WRITE_PROBE_PREFIX + "*.tmp-*"):
        for probe in fs.glob(path.rstrip("/") + "/" + pattern):
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(probe)


def check_markers(root: str, fp: str, units: list[InputUnit]) -> None:
    """Fail before any write when the output holds shards of another configuration, or made
    from an input that changed since (InputUnit.version).

    Every readable marker of every family is read (one batched read): a damaged first one must
    not hide the others' fingerprint, and a run naming other stages must not add its families
    beside the old ones (its index.json would drop them, its rejects files replace theirs).
    """
    fs, path = storage.filesystem(root)
    found = sorted(fs.glob(path.rstrip("/") + "/*/*.done.json")) if fs.exists(path) else []
    if not found:
        return
    by_index = {u.index: u for u in units}
    for name, data in sorted(fs.cat(found, on_error="omit").items()):
        try:
            marker = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a partial write: its unit is redone
        if not isinstance(marker, dict):
            continue
        stage, base = name.rsplit("/", 2)[-2:]
        url = storage.join(root, stage, base)
        # A marker before the field was decoded without ICC conversion. Refused though its inputs
        # may hold no such image: its shards hold tokens, nothing here can tell.
        made_by = marker.get("decode_version", 1)
        if marker.get("fingerprint") is not None and made_by != DECODE_VERSION:
            raise ValueError(f"{url} was made with image decoding version {made_by}, this bdt's is "
                             f"{DECODE_VERSION} (bdt/data/images.py DECODE_VERSION: some images now "
                             f"decode to other pixels), and a rerun would mix the two in one output: "
                             f"write to a new output directory, or delete "
                             f"{storage.join(root, '*', '*.done.json')} to redo every unit")
        if marker.get("fingerprint") not in (None, fp):
            raise ValueError(f"{url} was made with fingerprint {marker.get('fingerprint')}, this "
                             f"run's is {fp} (tokenizer, stages, buckets or preprocessing changed): "
                             f"write to a new output directory")
        stem = base.split(".", 1)[0]
        unit, source = by_index.get(int(stem) if stem.isdigit() else -1), marker.get("source")
        if unit is not None and marker.get("input_version") not in (None, unit.version) \
                and isinstance(source, str) and unit.named_by(source):
            raise ValueError(f"input {unit.name} changed since {url} was made from it (version "
                             f"{marker['input_version']}, now {unit.version}): write to a new output, or "
                             f"delete {storage.join(root, '*', stem + '.done.json')} to redo that unit")


def check_plan(root: str, units: list[dict]) -> None:
    """Write plan.json on the first run; later runs must keep unit i's input (appending is fine).

    Inputs are compared as they resolve (InputUnit.plan_entry), so another spelling of the same
    files resumes and the same spelling naming other files is refused. A plan an earlier bdt
    wrote names them as spelled: resolved here (a relative one from this folder, all it can
    say), then rewritten in this form."""
    url = storage.join(root, PLAN_NAME)
    old = read_json(url)
    if old is None and storage.exists(url):
        _damaged_plan(url, "not readable JSON")
    if old is not None:
        planned = _planned_units(url, old)
        for unit, prev in zip(units, planned):
            if unit != prev:
                # An earlier bdt listed a folder's hidden files too: the same folder, other units.
                hidden = any(p.startswith(".") for rel in prev["files"] for p in str(rel).split("/"))
                raise ValueError(f"{url}: input unit {unit['index']} was {_unit_text(prev)} and is "
                                 f"now {_unit_text(unit)}: the inputs changed" + (
                                     " (hidden files, names starting with '.', are read no more)"
                                     if hidden else "") + "; write to a new output")
        if len(units) < len(planned):
            raise ValueError(f"{url}: the plan had {len(planned)} input units, the inputs now give "
                             f"{len(units)}: write to a new output")
        if len(units) == len(planned) and old.get("schema") == PLAN_SCHEMA:
            return
        if len(units) > len(planned):
            # The manifest calls the shorter plan complete: drop it before the plan grows, so a run
            # stopped before its end leaves no index.json that training would take as the whole output.
            fs, index_path = storage.filesystem(storage.join(root, INDEX_NAME))
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(index_path)
    storage.write_bytes_atomic(url, json_bytes({"schema": PLAN_SCHEMA, "units": units}))


def _unit_text(unit: dict) -> str:
    """What a plan entry reads: a tar shard, or a folder's image files (named by the first, so a
    chunk shifted by an image added or removed shows where it starts now)."""
    if unit["kind"] != "folder":
        return f"the tar shard {unit['source']}"
    first = f" from {unit['files'][0]}" if unit["files"] else ""
    return f"{len(unit['files'])} image file(s) of the folder {unit['source']}{first}"


def _damaged_plan(url: str, why: str) -> NoReturn:
    # Rewriting it would drop what it guards: which inputs the existing shards were made from.
    raise ValueError(f"{url} is damaged ({why}): restore it, or write to a new output")


_UNIT_FIELDS = {"index": int, "kind": str, "source": str, "files": list}  # what InputUnit.to_dict writes


def _planned_units(url: str, plan: Any) -> list[dict]:
    """The units of a parsed plan.json, sources resolved; a plan of another shape is damaged,
    naming the key."""
    if not isinstance(plan, dict):
        _damaged_plan(url, f"a JSON {type(plan).__name__}, not an object")
    if plan.get("schema", PLAN_SCHEMA) != PLAN_SCHEMA:
        _damaged_plan(url, f"schema {plan['schema']!r}, this bdt reads {PLAN_SCHEMA} and plans without one")
    units = plan.get("units")
    if not isinstance(units, list):
        _damaged_plan(url, "'units' is missing" if units is None else "'units' is not a list")
    for i, unit in enumerate(units):
        if not isinstance(unit, dict):
            _damaged_plan(url, f"units[{i}] is not an object")
        for key, kind in _UNIT_FIELDS.items():
            if not isinstance(unit.get(key), kind):
                what = "is missing" if key not in unit else f"is not a {kind.__name__}"
                _damaged_plan(url, f"units[{i}].{key} {what}")
    if "schema" in plan:
        return units
    return [dict(unit, source=resolved_url(unit["source"])) for unit in units]


def build_index(root: str, identity: dict, config: dict, stages: dict[str, dict],
                markers: dict[str, list[dict]]) -> dict:
    """The manifest: per stage its buckets, shards (name, samples, bytes, sha256, upscaled,
    icc_ignored) and totals. `upscaled` (samples smaller than their bucket) and `icc_ignored`
    (samples whose ICC profile was ignored, images.Crops) are None for a shard whose marker an
    earlier bdt wrote, which did not count them, and then in the totals too."""
    out_stages = {}
    for name, info in stages.items():
        shards = [{"shard": f"{name}/{m['index']:06d}.tar", "source": m["source"], "samples": m["samples"],
                   "inputs": m["inputs"], "rejected": m["rejected"], "bytes": m["bytes"],
                   "sha256": m["sha256"], "upscaled": m.get("upscaled"), "icc_ignored": m.get("icc_ignored")}
                  for m in sorted(markers[name], key=lambda m: m["index"])]
        totals = {k: sum(s[k] for s in shards) for k in ("samples", "inputs", "rejected", "bytes")}
        for key in ("upscaled", "icc_ignored"):
            counts = [s[key] for s in shards]
            totals[key] = None if None in counts else sum(counts)
        out_stages[name] = dict(info, shards=shards, totals=totals)
    return {"schema": MARKER_SCHEMA, "token_shard_schema": TOKEN_SHARD_SCHEMA,
            "decode_version": DECODE_VERSION, "tokenizer": identity,
            "config": config, "stages": out_stages}


@contextlib.contextmanager
def output_lock(root: str) -> Iterator[None]:
    """Hold OUTPUT/lock.json (created exclusively, locally or on S3) while one run writes the output.

    Two runs at once would delete each other's temp files and could interleave plans or
    fingerprints; the second one fails instead, naming the first. A lock left by a killed run on
    this host (its process gone) is taken over, so rerunning the command just works. The lock
    never appears without its content (storage.create_exclusive).
    """
    url = storage.join(root, LOCK_NAME)
    created = _missing_dirs(root)
    storage.makedirs(root)
    fs, path = storage.filesystem(url)
    me = psutil.Process()
    mine = json_bytes({"host": socket.gethostname(), "pid": me.pid, "pid_start": me.create_time()})
    for attempt in range(2):
        if storage.create_exclusive(url, mine):
            break
        holder = read_json(url)
        if attempt or not _lock_is_stale(holder):
            raise ValueError(f"{url}: another extraction is writing this output ({holder}); wait for "
                             f"it to end, or delete {url} if it is no longer running")
        with contextlib.suppress(FileNotFoundError):  # its run ended meanwhile
            fs.rm_file(path)
    try:
        yield
    finally:
        fs.rm_file(path)
        # A run stopped by a config error leaves no empty output behind; rmdir never removes
        # a folder holding anything, and only folders this run made are tried.
        for directory in created:
            try:
                os.rmdir(directory)
            except OSError:
                break


def _missing_dirs(root: str) -> list[str]:
    """The local folders that making `root` creates, deepest first (none for a remote URL)."""
    if storage.is_remote(root):
        return []
    out, path = [], os.path.abspath(storage.filesystem(root)[1])
    while not os.path.exists(path):
        out.append(path)
        path = os.path.dirname(path)
    return out


def _lock_is_stale(holder: Any) -> bool:
    """True when the lock's run is known to be gone: its process on this host has ended (or the
    lock is unreadable: damaged, or created empty by an earlier bdt killed while writing it).
    Another host's run cannot be checked."""
    if not isinstance(holder, dict):
        return True
    return holder.get("host") == socket.gethostname() and not holder_alive(holder)
