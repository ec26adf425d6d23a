"""What a checkpoint's completion marker promises about its files, and the check of that promise.

The marker lists every file of the checkpoint with its size and sha256 (system §2). sha256 over
blake2b: on the machines measured by bench/checkpoint_hash.py (x86 with SHA extensions, which
current server CPUs have) hashlib's sha256 is the faster of the two, and the extraction
manifest already uses it. A file passes when it exists, has the recorded size and hash, and,
for a torch.save file, its pickle names nothing a weights-only load refuses (safe_load.py).
"""

from __future__ import annotations

import hashlib
import json
import os

from bdt import storage

HASH = "sha256"
MARKER = "COMPLETE"  # a checkpoint directory's completion marker, written last


class CheckpointUnusable(ValueError):
    """A checkpoint failed verification or loading; the message (the same on every rank) names
    its path and the reason."""


def digest(path: str) -> dict[str, int | str]:
    """{"bytes": size, "sha256": hex digest} of a local file, streamed."""
    with open(path, "rb") as f:
        h = hashlib.file_digest(f, HASH)
        return {"bytes": f.tell(), HASH: h.hexdigest()}


def digest_bytes(data: bytes) -> dict[str, int | str]:
    return {"bytes": len(data), HASH: hashlib.new(HASH, data).hexdigest()}


def unsafe_name(rel: str) -> str | None:
    """Why a marker's file name cannot name a file inside the checkpoint directory (a hostile or
    damaged marker must not make anyone read or write outside it); None if it can."""
    if not isinstance(rel, str) or not rel:
        return "an empty file name"
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        return f"file name {rel!r}, not a plain relative path inside the checkpoint"
    return None


def problem(local_dir: str, rel: str, entry: dict) -> str | None:
    """Why the file `rel` under local_dir is not what the marker's `entry` says; None if it is.
    Symlinks are refused: a checkpoint's files are its own, not files elsewhere on this host."""
    unsafe = unsafe_name(rel)
    if unsafe:
        return unsafe
    if not isinstance(entry, dict):
        return f"{rel}: its marker entry is {type(entry).__name__}, not {{bytes, {HASH}}}"
    path = os.path.join(local_dir, *rel.split("/"))
    if os.path.realpath(path) != os.path.join(os.path.realpath(local_dir), *rel.split("/")):
        return f"{rel}: a symlink (a checkpoint's files must be its own)"
    if not os.path.isfile(path):
        return f"{rel}: missing"
    size = os.path.getsize(path)
    if size != entry.get("bytes"):
        return f"{rel}: {size} bytes, the marker says {entry.get('bytes')} (truncated or replaced)"
    if digest(path)[HASH] != entry.get(HASH):
        return f"{rel}: {HASH} differs from the marker's (damaged or replaced)"
    if rel.endswith(".pt"):
        from bdt.training.safe_load import unsafe_globals
        from bdt.weights import compressed_records, listing  # torch: not for marker readers

        try:
            refused = unsafe_globals(path)
        except (ValueError, RuntimeError) as e:
            return f"{rel}: not a torch.save zip archive ({e})"
        if refused:
            return f"{rel}: its pickle names {', '.join(refused)}, which weights-only loading refuses"
        packed = compressed_records(path)
        if packed:
            return (f"{rel}: record(s) {listing(packed)} are compressed, which torch.save never "
                    f"writes (loading would inflate them)")
    return None


MARKER_MAX_BYTES = 64 << 20  # far above a real marker (~150 bytes a file); refuse, don't parse
# What the fields of a marker that resume and sampling read must be, when present.
_MARKER_FIELDS = {"step": int, "world_size": int, "from_world_size": int, "settings": dict,
                  "files": dict, "engines": list, "universal": list}


def marker_problem(marker: object) -> str | None:
    """Why a parsed marker is not one bdt wrote (wrong types: a damaged or foreign file); None
    if its fields are usable. File entries are checked per file (`problem`)."""
    if not isinstance(marker, dict):
        return "is not a JSON object"
    for key, kind in _MARKER_FIELDS.items():
        value = marker.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"field {key!r} is {type(value).__name__}, not {kind.__name__}"
    for key in ("world_size", "from_world_size"):
        if marker.get(key) is not None and marker[key] < 1:
            return f"field {key!r} is {marker[key]}, not a positive world size"
    if marker.get("step") is not None and marker["step"] < 0:
        return f"field 'step' is {marker['step']}, not a step number"
    unsafe = [unsafe_name(rel) for rel in marker.get("files") or {} if unsafe_name(rel)]
    if unsafe:  # refused whole: a marker naming files outside its directory is not bdt's
        return f"lists {unsafe[0]}"
    names = [n for key in ("engines", "universal") for n in marker.get(key) or []]
    bad = [n for n in names if not isinstance(n, str) or unsafe_name(n) or "/" in n]
    if bad:
        return f"engine names {bad[:4]!r} are not plain directory names"
    return None


def read_marker(checkpoint: str) -> dict:
    """The marker of the checkpoint directory `checkpoint` (path or URL), its fields checked;
    CheckpointUnusable naming it when it is missing, oversized, not JSON or of wrong types;
    the OSError, naming it, when the store cannot serve it (a timeout, a refusal)."""
    url = storage.join(checkpoint, MARKER)
    try:
        fs, path = storage.filesystem(url)
        with storage.naming_url(url), fs.open(path, "rb") as f:
            data = f.read(MARKER_MAX_BYTES + 1)
        if len(data) > MARKER_MAX_BYTES:
            raise ValueError(f"over {MARKER_MAX_BYTES} bytes")
        marker = json.loads(data)
    # Only what the marker is (gone, not a file, not bdt's JSON) condemns the checkpoint: a store
    # that times out or refuses is raised as it is, not taken for damage and passed over.
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError,
            RecursionError) as e:  # RecursionError: nested too deep
        raise CheckpointUnusable(f"{checkpoint}: its {MARKER} marker cannot be read "
                                 f"({type(e).__name__}: {e})") from None
    wrong = marker_problem(marker)
    if wrong:
        raise CheckpointUnusable(f"{url}: the marker {wrong}")
    return marker


def rel_name(local_dir: str, path: str) -> str:
    return os.path.relpath(path, local_dir).replace(os.sep, "/")


def unlisted(local_dir: str, files: dict, skip: set[str]) -> list[str]:
    """Files (and symlinks) under local_dir that the marker does not list, outside the engine
    directories in `skip`; sorted."""
    out = []
    for dirpath, dirs, names in os.walk(local_dir):
        links = [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]
        for name in names + links:
            rel = rel_name(local_dir, os.path.join(dirpath, name))
            if rel not in files and rel != MARKER and rel.split("/", 1)[0] not in skip:
                out.append(rel)
    return sorted(out)


def digest_all(local_dir: str, skip: set[str]) -> dict[str, dict]:
    """Size and hash of every file under local_dir (relative names) not in `skip`."""
    out = {}
    for dirpath, _, names in os.walk(local_dir):
        for name in names:
            rel = rel_name(local_dir, os.path.join(dirpath, name))
            if rel not in skip and rel != MARKER:
                out[rel] = digest(os.path.join(dirpath, name))
    return out
