"""What the resume wrapper reads of a run: its run dir and checkpoint root, from the training
command's own config, and its complete checkpoints (the wrapper's measure of progress)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from omegaconf import OmegaConf

from bdt import storage
from bdt.config import to_yaml
from bdt.train import load_config
from bdt.training.checkpoint_store import list_checkpoints
from bdt.training.integrity import CheckpointUnusable, read_marker
from bdt.training.run_dir import CONFIG_NAME, SUMMARY_NAME, checkpoint_root

TRAIN_SCRIPT = "bdt/train.py"
TOKENIZER_SCRIPT = "tokenizers/train.py"


@dataclass(frozen=True)
class RunPaths:
    run_dir: str
    checkpoint_dir: str
    config: str = ""  # the command's resolved config as the trainer saves it; "" if hidden


def paths_from_command(cmd: list[str]) -> RunPaths | None:
    """run_dir and checkpoint root of a `... bdt/train.py ARGS` / `... -m bdt.train ARGS` or
    `... tokenizers/train.py ARGS` command, loaded and validated with the trainer's own config
    code; None if no such script is in it."""
    for i, arg in enumerate(cmd):
        if arg.endswith(TRAIN_SCRIPT) or (arg == "bdt.train" and i > 0 and cmd[i - 1] == "-m"):
            from bdt.training.ar.config import validate

            cfg = OmegaConf.to_object(load_config(cmd[i + 1:]))
        elif arg.endswith(TOKENIZER_SCRIPT):
            from bdt.training.tokenizer.config import load_command, validate

            cfg, export_only = load_command(cmd[i + 1:])  # as the trainer has it: omegaconf's
            if export_only:
                raise ValueError("--export-only runs once: run it without this wrapper")
        else:
            continue
        validate(cfg)
        return RunPaths(cfg.run_dir, checkpoint_root(cfg.run_dir, cfg.checkpoint.dir),
                        to_yaml(cfg) if cfg.checkpoint.resume else "")
    return None


def finished_step(paths: RunPaths, checkpoints: dict[str, tuple[int, object]]) -> int | None:
    """The step the run finished at, when launching its command again could only repeat its end
    (reload the last checkpoint, export again): rank 0's summary.json says it finished there (not
    stopped, not cut short by its time limit) and the run's config.yaml is the command's config.
    None otherwise (a changed config trains on)."""
    if not paths.config:
        return None
    summary, _ = read_summary(paths.run_dir)
    try:
        with open(os.path.join(paths.run_dir, CONFIG_NAME), encoding="utf-8") as f:
            same_config = f.read() == paths.config
    except (OSError, ValueError):  # none, damaged: launch, as before
        return None
    if not (same_config and summary is not None and summary.get("stopped") is False
            and not summary.get("timed_out")):
        return None
    step = summary.get("step")
    return step if type(step) is int and step == newest_step(checkpoints) else None


def read_summary(run_dir: str, written_after: float = 0.0) -> tuple[dict | None, str]:
    """(the summary.json rank 0 wrote in `run_dir` after `written_after`, ""); (None, what is
    wrong) when there is no such summary or it is not a JSON object (a damaged or foreign file
    must not end the supervision with a traceback)."""
    path = os.path.join(run_dir, SUMMARY_NAME)
    missing = f"no fresh {path} (rank 0 runs on another node?)"
    try:
        if storage.is_remote(path) or os.path.getmtime(path) < written_after:
            return None, missing
        with open(path, "rb") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None, missing
    except (OSError, ValueError, RecursionError) as e:  # a directory, not UTF-8, not JSON
        return None, f"an unreadable {path} ({type(e).__name__}: {e})"
    if not isinstance(record, dict):
        return None, f"a {path} that holds no JSON object"
    return record, ""


def complete_checkpoints(checkpoint_dir: str) -> dict[str, tuple[int, object]]:
    """tag -> (step, the marker's write time) of every checkpoint with its COMPLETE marker. The
    time tells a checkpoint written again (after the trainer passed over a damaged one) from
    the old one. Read without torch: importing it costs the wrapper seconds of a shared core."""
    root = checkpoint_dir.rstrip("/")
    out = {}
    for step, tag, complete in list_checkpoints(root):
        if complete:
            try:
                written = read_marker(storage.join(root, tag)).get("time")
            except CheckpointUnusable:
                written = None
            out[tag] = (step, written)
    return out


def newest_step(checkpoints: dict[str, tuple[int, object]]) -> int | None:
    return max((step for step, _ in checkpoints.values()), default=None)
