"""`load_trained(path)`: a trained model from wherever a run left one. `path` is
  * an export (`<run_dir>/export`: export_reader.py);
  * a training run dir: its `export/` if present, else its newest complete checkpoint that
    reads (a damaged one is passed over, as the trainer's resume does: checkpoint_reader.py);
  * a checkpoint dir `<run_dir>/checkpoints/step_N` (complete, i.e. with its marker).
"""

from __future__ import annotations

import logging
import os

import torch

from bdt import storage
from bdt.generation.checkpoint_reader import from_run_checkpoint
from bdt.generation.export_reader import load_export
from bdt.generation.trained import TrainedModel
from bdt.model.ar import CONFIG_NAME
from bdt.training import run_dir as layout

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    """auto, cpu or cuda[:N]; ValueError for anything else or a GPU this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s)")
    return device


def load_trained(path: str, device: str | torch.device = "cpu") -> TrainedModel:
    """Resolve `path` (export, or run dir: export or newest checkpoint) and load it on `device`."""
    from bdt.training.checkpoint import MARKER

    if storage.is_remote(path):  # run dirs, and so their exports, are local (checkpoints may be remote)
        raise OSError(f"model path {path!r} is remote: sampling reads a local export or run "
                      f"directory; copy it to this machine first")
    if not os.path.exists(path):
        raise OSError(f"model path {path!r} does not exist")
    if not os.path.isdir(path):
        raise OSError(f"model path {path!r} is not a directory (give a training export or run dir)")
    if not os.path.exists(os.path.join(path, CONFIG_NAME)):
        if os.path.isfile(os.path.join(layout.export_dir(path), CONFIG_NAME)):
            path = layout.export_dir(path)
        elif os.path.isfile(os.path.join(path, layout.CONFIG_NAME)):
            return from_run_checkpoint(path, device)
        elif os.path.isfile(os.path.join(path, MARKER)):  # <run_dir>/checkpoints/step_N
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
            if os.path.isfile(os.path.join(run_dir, layout.CONFIG_NAME)):
                return from_run_checkpoint(run_dir, device, os.path.abspath(path))
    for _ in range(2):
        before = _folder_identity(path)
        try:
            trained, error = load_export(path, device), None
        except Exception as e:  # noqa: BLE001 - raised as it was unless the folder was swapped
            trained, error = None, e
        if _folder_identity(path) == before:
            if error is not None:
                raise error
            return trained
        log.warning("%s was replaced while it loaded (its run exported again): loading it again",
                    path)
    raise OSError(f"{path!r} was replaced while it loaded, twice: a training run is exporting "
                  f"to it; load it once that run has finished")


def _folder_identity(path: str) -> tuple[int, int, int] | None:
    """What changes when a run's end swaps its new export in under `path` (export.py renames a
    whole folder there): None while the name is missing between two renames."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns
