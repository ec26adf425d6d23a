"""What a checkpoint's completion marker promises about its files, and the check of that promise.

The marker lists every file of the checkpoint with its size and sha256 (system §2). sha256 over
blake2b: on the machines measured by bench/checkpoint_hash.py (x86 with SHA extensions, which
current server CPUs have) hashlib's sha256 is the faster of the two, and the extraction
manifest already uses it. A file passes when it exists, has the recorded size and hash, and,
for a torch.save file, its pickle names nothing a weights-only load refuses (safe_load.py).
"""

from __future__ import annotations

import hashlib
import os

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


def problem(local_dir: str, rel: str, entry: dict) -> str | None:
    """Why the file `rel` under local_dir is not what the marker's `entry` says; None if it is."""
    path = os.path.join(local_dir, *rel.split("/"))
    if not os.path.isfile(path):
        return f"{rel}: missing"
    size = os.path.getsize(path)
    if size != entry.get("bytes"):
        return f"{rel}: {size} bytes, the marker says {entry.get('bytes')} (truncated or replaced)"
    if digest(path)[HASH] != entry.get(HASH):
        return f"{rel}: {HASH} differs from the marker's (damaged or replaced)"
    if rel.endswith(".pt"):
        from bdt.training.safe_load import unsafe_globals

        try:
            refused = unsafe_globals(path)
        except (ValueError, RuntimeError) as e:
            return f"{rel}: not a torch.save zip archive ({e})"
        if refused:
            return f"{rel}: its pickle names {', '.join(refused)}, which weights-only loading refuses"
    return None
