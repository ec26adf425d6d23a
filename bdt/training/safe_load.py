"""Loading DeepSpeed checkpoint files without unpickling code (system §2).

DeepSpeed 0.19.8 reads its files with `torch.load(weights_only=False)`: in its checkpoint engine
(`TorchCheckpointEngine.load`), in the universal-checkpoint loaders (`universal_checkpoint.py`,
ZeRO-3's `_load_universal_checkpoint`) and in `ds_to_universal`. A checkpoint directory may be
`s3://` and written by others, so every such load here runs under `weights_only_loads()`:
torch's `TORCH_FORCE_WEIGHTS_ONLY_LOAD` turns each of those calls into a weights-only load, and
the three DeepSpeed classes its files hold (measured on ZeRO 0-3, fp32 and bf16, before and after
`ds_to_universal`) are allowed as plain data. Anything else a pickle names is refused, not run.

`unsafe_globals` reads a file's pickle without running it, so that every rank can refuse a bad
file while the checkpoint is verified, before any rank enters DeepSpeed's collective load.
`python -m bdt.training.safe_load ARGS` runs DeepSpeed's `ds_to_universal ARGS` the same way.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Iterator

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
PARENT_ENV = "BDT_CONVERTER_PARENT"  # the pid of the rank that started the converter


def deepspeed_globals() -> list[type]:
    """The classes DeepSpeed's optimizer-state files pickle besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def allow_deepspeed_globals() -> None:
    """Allow DeepSpeed's plain-data classes in weights-only loads, for the whole process (torch's
    `safe_globals` context removes them again on exit, which breaks nested use)."""
    torch.serialization.add_safe_globals(deepspeed_globals())


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside is weights-only, whatever its caller asked for."""
    allow_deepspeed_globals()
    before = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = before


def unsafe_globals(path: str) -> list[str]:
    """The globals a torch.save file's pickle names that a weights-only load would refuse
    (read without unpickling); ValueError for a file that is not a zip-format torch.save."""
    allow_deepspeed_globals()
    return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))


class RecordingCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, remembering the files this rank saved (so that the
    writer hashes them for the marker) and loading weights-only."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.saved: list[str] = []

    def save(self, state_dict, path: str):
        # Through a Python file: torch's own writer reports a full disk as "basic_ios::clear:
        # iostream error"; over a file object, its RuntimeError carries the write's OSError.
        with open(path, "wb") as f:
            torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)
        self.saved.append(path)

    def load(self, path: str, map_location=None):
        allow_deepspeed_globals()
        return torch.load(path, map_location=map_location, weights_only=True)


def recording_engine(engine) -> RecordingCheckpointEngine:
    """The engine's checkpoint engine, replaced by a RecordingCheckpointEngine on first use."""
    if not isinstance(engine.checkpoint_engine, RecordingCheckpointEngine):
        engine.checkpoint_engine = RecordingCheckpointEngine(engine._config)
    return engine.checkpoint_engine


def _die_with_parent() -> None:
    """When the process that started this one dies (a rank SIGKILLed mid-conversion), kill this
    process group: an orphan converter would go on writing into the conversion directory the
    next launch rebuilds, and its forked workers would wait on it forever."""
    parent = int(os.environ.get(PARENT_ENV, os.getppid()))  # the rank may be gone already

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        if os.getpgrp() == os.getpid():  # started in its own session (to_universal)
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def _run_ds_to_universal() -> None:
    # Its extraction workers are forked, so they inherit both the variable and the allowlist;
    # under another start method they would fail closed (refusing the DeepSpeed classes).
    sys.argv = ["ds_to_universal", *sys.argv[1:]]
    with weights_only_loads():
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__",
                         alter_sys=True)


if __name__ == "__main__":
    _die_with_parent()
    _run_ds_to_universal()
