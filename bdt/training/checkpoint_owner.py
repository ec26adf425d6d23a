"""One checkpoint root, one run (system §2): a run never resumes from, writes into or prunes the
checkpoints of another run whose `checkpoint.dir` its config kept.

A run is who its run directory says: `<run_dir>/RUN_ID`, a random id made at the run's first
start. The id moves with the directory, so a run dir moved, or mounted at another path on another
node, is still the same run; a new run_dir is a new run. The first run to use a checkpoint root
records itself in `<root>/owner.json` (created exclusively, locally and on S3:
storage.create_exclusive). Every later start compares, before anything under the root is read
or written:
  - the record names this run: go on (the record follows a run dir that moved);
  - it names this run, and the run dir it records still holds the same RUN_ID: this run dir is
    a copy of that one, and the two would share one checkpoint history: refused;
  - it names another run: refused, naming both, unless `checkpoint.adopt` is that run's id. This
    run then takes the root over (to continue or fork from its checkpoints on purpose), and the
    run it took it from is refused at its next save or start;
  - there is none (a root written by an earlier bdt, or a new one): this run takes the root.
Only global rank 0 reads and writes these files (CheckpointManager.bind shares the verdict).
Readers of checkpoints (sampling, export-only, the resume wrapper) never look at the record.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid

from bdt import storage
from bdt.training.run_dir import RUN_ID_NAME

OWNER_NAME = "owner.json"
_RUN_ID = re.compile(r"[0-9a-f]{16,64}")
log = logging.getLogger(__name__)


class CheckpointRootTaken(ValueError):
    """The checkpoint root belongs to another run (or this run dir is a copy of its owner's)."""


def run_id(run_dir: str) -> str:
    """This run's id, from <run_dir>/RUN_ID (made on the first call); ValueError naming the file
    when it holds something else."""
    path = os.path.join(run_dir, RUN_ID_NAME)
    storage.create_exclusive(path, f"{uuid.uuid4().hex[:16]}\n".encode())
    try:
        found = _read_run_id(path)
    except OSError as e:  # a directory in its place, no permission
        problem = f"cannot be read ({e.strerror or e})"
    else:
        problem = None if _RUN_ID.fullmatch(found) else f"holds no run id ({found!r})"
    if problem:
        raise ValueError(f"{path} {problem}: it tells this run's checkpoint root which run this "
                         f"is. Restore it, or delete it to start {run_dir} as a new run (with a "
                         f"checkpoint.dir of its own)")
    return found


def claim(root: str, run_dir: str, adopt: str = "") -> str:
    """Rank 0 alone: make `root` this run's, or find that it is; returns the run id.
    CheckpointRootTaken when another run owns it and `adopt` is not that run's id, or when this
    run dir is a copy of the owner's."""
    me, here = run_id(run_dir), os.path.abspath(run_dir)
    url = storage.join(root, OWNER_NAME)
    record = {"run_id": me, "run_dir": here, "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    owner = read_owner(url)
    if owner is None:
        storage.create_exclusive(url, json.dumps(record).encode())
        # Read back: a run starting at the same moment may have won (and a store without
        # conditional puts lets the last writer win instead of refusing).
        owner = read_owner(url)
        if owner is None:
            raise OSError(f"{url}: written, then not found: is something deleting files under {root}?")
        if owner["run_id"] == me:
            log.info("checkpoint root %s had no owner: it is now this run's (%s, run dir %s)",
                     root, me, here)
    if owner["run_id"] != me:
        if adopt != owner["run_id"]:
            raise CheckpointRootTaken(_taken(root, url, owner, me, here, adopt))
        earlier = owner.get("adopted_from") if isinstance(owner.get("adopted_from"), list) else []
        record["adopted_from"] = earlier + [{k: owner.get(k) for k in ("run_id", "run_dir", "since")}]
        storage.write_bytes_atomic(url, json.dumps(record).encode())
        log.warning("checkpoint.adopt: checkpoint root %s, run %s's until now (run dir %s), is this "
                    "run's (%s): that run can no longer save there", root, owner["run_id"],
                    owner.get("run_dir"), me)
    elif owner.get("run_dir") != here:
        _follow_move(root, url, owner, here)
    return me


def owner_change(root: str, me: str) -> str | None:
    """Rank 0, before a save: why run `me` may no longer write under `root` (another run adopted
    it meanwhile), or None. A record that cannot be read is logged, not fatal: the start checked."""
    url = storage.join(root, OWNER_NAME)
    try:
        owner = read_owner(url)
    except (OSError, ValueError) as e:
        log.warning("%s could not be read before this save (%s); saving", url, e)
        return None
    if owner is None or owner["run_id"] == me:
        return None
    return (f"checkpoint root {root} was taken over by run {owner['run_id']} (run dir "
            f"{owner.get('run_dir')}, checkpoint.adopt; {url}) while this run, {me}, was training: "
            f"this run stops without saving, so that two runs never write one checkpoint history")


def read_owner(url: str) -> dict | None:
    """The owner record at `url`; None when there is none, ValueError naming it when damaged."""
    fs, path = storage.filesystem(url)
    fs.invalidate_cache(path)  # s3fs keeps sizes and ETags from listings; another run rewrites it
    try:
        with storage.naming_url(url, "reading"):
            raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(raw)
        # run_dir is compared and opened as a path: another type is damage too
        if not isinstance(owner, dict) or not isinstance(owner.get("run_id"), str) or \
                not isinstance(owner.get("run_dir", ""), str):
            raise ValueError("not a JSON object with a run_id and run_dir of strings")
    except (ValueError, RecursionError) as e:  # RecursionError: nested past the parser
        raise ValueError(f"checkpoint root owner record {url} is damaged ({e}): if the root is this "
                         f"run's, delete the record (the next start writes it again)") from None
    return owner


def _taken(root: str, url: str, owner: dict, me: str, here: str, adopt: str) -> str:
    wrong = f" (checkpoint.adopt is {adopt!r}, not that run's id)" if adopt else ""
    return (f"checkpoint root {root} belongs to another run: {owner['run_id']} (run dir "
            f"{owner.get('run_dir')}, since {owner.get('since')}; {url}), not this one, {me} (run "
            f"dir {here}){wrong}. Resuming from its checkpoints or saving and pruning beside them "
            f"would mix two experiments. Give this run its own checkpoint.dir (empty: "
            f"{here}/checkpoints), or, to continue from that run's checkpoints on purpose (that "
            f"run can then no longer save there), set checkpoint.adopt={owner['run_id']}")


def _follow_move(root: str, url: str, owner: dict, here: str) -> None:
    """The owner's run dir is recorded elsewhere: a move (or another mount) is followed; a copy
    that left the original in place, holding the same id, is refused, unless the root lies inside
    the run dir (the default <run_dir>/checkpoints): then the copy took its own checkpoints along."""
    old = owner.get("run_dir") or ""
    if os.path.isdir(old) and not _inside(root, here):
        if os.path.samefile(old, here):
            return  # the same directory by another path
        try:
            old_id = _read_run_id(os.path.join(old, RUN_ID_NAME))
        except OSError:
            old_id = None  # no readable id left there: the run moved
        if old_id == owner["run_id"]:
            raise CheckpointRootTaken(
                f"run dir {here} has the run id of {old} ({owner['run_id']}), which owns checkpoint "
                f"root {root}: it is a copy, and the two would share one checkpoint history. Delete "
                f"{here}/{RUN_ID_NAME} to start it as a new run (with a checkpoint.dir of its own), "
                f"or, if nothing trains in {old} any more, delete {old}/{RUN_ID_NAME}")
    storage.write_bytes_atomic(url, json.dumps({**owner, "run_dir": here}).encode())
    log.info("checkpoint root %s: its run %s moved from %s to %s", root, owner["run_id"], old, here)


def _inside(root: str, run_dir: str) -> bool:
    if storage.is_remote(root):
        return False
    return os.path.commonpath([os.path.abspath(root), run_dir]) == run_dir


def _read_run_id(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(200).decode("utf-8", "replace").strip()
