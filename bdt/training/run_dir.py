"""What a training run directory holds: one place for the trainers that write it and the readers
(sampling and evaluation, the resume wrapper) that look things up in it without importing a
trainer.

  <run_dir>/config.yaml     the resolved config (bdt.config.save_resolved)
  <run_dir>/RUN_LOCK        the job that holds the run (run_lock.py)
  <run_dir>/RUN_ID          the run's identity, a random id made at its first start: it moves
                            with the directory; the checkpoint root records it (checkpoint_owner.py)
  <run_dir>/checkpoints/    the default checkpoint root (`checkpoint.dir` moves it): step_N/ with
                            its COMPLETE marker (checkpoint.py), owner.json naming its run
  <run_dir>/backbone/       the AR model's LLM config.json and text tokenizer, no weights (written
                            at each start): with a checkpoint's weights, the model without the
                            pretrained LLM's folder (bdt.generation.checkpoint_reader)
  <run_dir>/export/         the trained model, written when the run ends; the AR trainer's holds
                            the model (BitDanceModel.save_pretrained, with the record of its
                            llm/config.json that sampling compares: llm_config_record.py),
                            image_tokenizer/ and train_config.yaml
  <run_dir>/launch_error.json  an error a rank met before its first step (`record_launch_error`):
                            a launcher's exit code cannot say why, and bdt.cluster.resume does not
                            restart a job its configuration or inputs stop
  <run_dir>/summary.json    rank 0's last word: the step it ended at and whether a signal
                            stopped it or its time limit cut it short (`write_summary`)
  <run_dir>/metrics.jsonl, tensorboard/, samples/, eval/
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from omegaconf import DictConfig

from bdt import storage
from bdt.config import RESOLVED_CONFIG_NAME, ConfigError, read_resolved_yaml

CONFIG_NAME = RESOLVED_CONFIG_NAME
EXPORT_DIR = "export"
BACKBONE_DIR = "backbone"
EXPORT_IMAGE_TOKENIZER_DIR = "image_tokenizer"
EXPORT_TRAIN_CONFIG_NAME = "train_config.yaml"
LAUNCH_ERROR = "launch_error.json"
SUMMARY_NAME = "summary.json"
RUN_ID_NAME = "RUN_ID"


def checkpoint_root(run_dir: str, configured: str = "") -> str:
    """The checkpoint root of a run: `checkpoint.dir` when set, else <run_dir>/checkpoints."""
    return configured or os.path.join(run_dir, "checkpoints")


def export_dir(run_dir: str) -> str:
    return os.path.join(run_dir, EXPORT_DIR)


def read_config(path: str) -> DictConfig:
    """A resolved config as a trainer wrote it, without the trainer's schema (readers need a few
    of its keys); OSError naming the file when it cannot be read or holds an interpolation."""
    try:
        return read_resolved_yaml(path)
    except ConfigError as e:
        raise OSError(str(e)) from None


def record_launch_error(run_dir: str, exc: BaseException) -> None:
    """<run_dir>/LAUNCH_ERROR: the message, and the type and errno of the error and its causes."""
    chain, link = [], exc
    while link is not None and len(chain) < 8:
        number = getattr(link, "errno", None)
        chain.append({"types": [t.__name__ for t in type(link).__mro__[:-2]],
                      "errno": number if isinstance(number, int) else None})
        link = link.__cause__ or link.__context__
    record = {"time": time.time(), "host": socket.gethostname(),
              "rank": os.environ.get("RANK", "0"), "message": str(exc), "errors": chain}
    with contextlib.suppress(Exception):  # the error itself, on stderr, is what must get out
        storage.write_bytes_atomic(storage.join(run_dir, LAUNCH_ERROR), json.dumps(record).encode())


def clear_launch_error(run_dir: str) -> None:
    """An earlier launch's error is history once a launch got past its set-up."""
    fs, path = storage.filesystem(storage.join(run_dir, LAUNCH_ERROR))
    with contextlib.suppress(OSError):
        fs.rm(path)


class LaunchRecord:
    """What a trainer's entry point tells bdt.cluster.resume about its launch: an error met before
    the run was set up goes to <run_dir>/LAUNCH_ERROR (`failed`); once it is set up (`set_up`),
    rank 0 clears an earlier launch's error."""

    def __init__(self) -> None:
        self.run_dir, self.started = "", False

    def set_up(self, is_main: bool) -> None:
        self.started = True
        if is_main:
            clear_launch_error(self.run_dir)

    def failed(self, exc: BaseException) -> None:
        if self.run_dir and not self.started:
            record_launch_error(self.run_dir, exc)


def write_summary(run_dir: str, step: int | None, stopped: bool, timed_out: bool, **more) -> None:
    """<run_dir>/SUMMARY_NAME (rank 0, at the very end): `stopped` by a signal (the run goes on
    when launched again), `timed_out` at its time limit (saved and exported early), or neither:
    finished at `step` (None: stopped before its first step, at an unknown start step)."""
    summary = {"step": step, "stopped": stopped, "timed_out": timed_out, **more}
    storage.write_bytes_atomic(storage.join(run_dir, SUMMARY_NAME),
                               json.dumps(summary, indent=1).encode())
