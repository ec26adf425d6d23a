"""What a training run directory holds: one place for the trainers that write it and the readers
(sampling and evaluation, the resume wrapper) that look things up in it without importing a
trainer.

  <run_dir>/config.yaml     the resolved config (bdt.config.save_resolved)
  <run_dir>/RUN_LOCK        the job that holds the run (run_lock.py)
  <run_dir>/checkpoints/    the default checkpoint root (`checkpoint.dir` moves it): step_N/ with
                            its COMPLETE marker (checkpoint.py)
  <run_dir>/export/         the trained model, written when the run ends; the AR trainer's holds
                            the model (BitDanceModel.save_pretrained), image_tokenizer/ and
                            train_config.yaml
  <run_dir>/metrics.jsonl, tensorboard/, samples/, eval/, summary.json
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from bdt.config import RESOLVED_CONFIG_NAME, ConfigError, read_yaml

CONFIG_NAME = RESOLVED_CONFIG_NAME
EXPORT_DIR = "export"
EXPORT_IMAGE_TOKENIZER_DIR = "image_tokenizer"
EXPORT_TRAIN_CONFIG_NAME = "train_config.yaml"


def checkpoint_root(run_dir: str, configured: str = "") -> str:
    """The checkpoint root of a run: `checkpoint.dir` when set, else <run_dir>/checkpoints."""
    return configured or os.path.join(run_dir, "checkpoints")


def export_dir(run_dir: str) -> str:
    return os.path.join(run_dir, EXPORT_DIR)


def read_config(path: str) -> DictConfig:
    """A resolved config as a trainer wrote it, without the trainer's schema (readers need a few
    of its keys); OSError naming the file when it cannot be read."""
    try:
        return read_yaml(path)
    except ConfigError as e:
        raise OSError(str(e)) from None
