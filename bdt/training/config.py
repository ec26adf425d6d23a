"""Config sections both trainers share, so that both speak one vocabulary: `run_dir`,
`checkpoint:` and `logging:` mean the same thing in an AR and a tokenizer training config."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from bdt.storage import is_remote, local_path
from bdt.training.run_dir import export_dir

_SHELL_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass
class CheckpointConfig:
    dir: str = ""  # local dir or s3://...; "" = <run_dir>/checkpoints
    every: int = 1000  # optimizer steps; 0 = only at the end and on preemption
    keep_last: int = 3  # complete checkpoints kept; 0 = keep them all
    # Auto-resume from the newest complete checkpoint that verifies; false starts at step 0, and
    # is refused where complete checkpoints are (a later resume would continue from them).
    resume: bool = True
    staging_dir: str = ""  # local staging for a remote dir ("" = under the system temp dir)
    # The run id (RUN_ID) of another run whose checkpoint dir this run takes over on purpose, to
    # continue or fork from its checkpoints; that run can then no longer save there.
    adopt: str = ""
    # false: no checkpoint when the run ends (its last stage done, or time_limit_min), for a
    # measurement nobody resumes (configs/cluster/gpu_1b_mfu.yaml: ~17 GB of ZeRO-2 state at 1.2B,
    # tens of seconds). A stop signal still saves; a rerun starts from the last periodic one.
    at_end: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first bad key (as `checkpoint.<key>`)."""
        for key in ("every", "keep_last"):
            if getattr(self, key) < 0:
                raise ValueError(f"checkpoint.{key} must be >= 0 (0 = "
                                 f"{'only at the end' if key == 'every' else 'keep all'}), "
                                 f"got {getattr(self, key)}")
        if is_remote(self.staging_dir):  # DeepSpeed writes a checkpoint into it as local files
            raise ValueError(f"checkpoint.staging_dir must be a local directory, got "
                             f"{self.staging_dir!r} (checkpoint.dir may be remote)")
        check_plain_local("checkpoint.dir", self.dir)
        check_plain_local("checkpoint.staging_dir", self.staging_dir)


@dataclass
class LoggingConfig:
    every: int = 10  # steps between metric records (the log, JSONL, TensorBoard)
    tensorboard: bool = True

    def validate(self) -> None:
        if self.every < 1:
            raise ValueError(f"logging.every must be >= 1, got {self.every}")


def check_run_dir(run_dir: str) -> None:
    """run_dir holds the run lock, metrics and TensorBoard files, written as local files (a
    shared filesystem on a cluster); only checkpoint.dir may be an object store URL."""
    if not run_dir or is_remote(run_dir):
        raise ValueError(f"run_dir must be a local directory, got {run_dir!r} (put checkpoints "
                         f"on an object store with checkpoint.dir=s3://...)")
    check_plain_local("run_dir", run_dir)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"run_dir {run_dir!r} is a file, not a directory")
    export = export_dir(run_dir)  # written at the end: found now, not after the whole run
    if os.path.lexists(export) and not os.path.isdir(export):
        raise ValueError(f"{export} is a file, where the run writes its export: move it away")


def check_plain_local(key: str, path: str) -> None:
    """ValueError for a `~/x`, `file:` or `local:` name of a trainer's directory (any number of
    slashes: fsspec drops them all): the trainers use those through the OS too, which reads a
    folder named `~` or `file:` where storage reads $HOME/x or /x, so a run's files went to two
    places. And for a shell variable in it, which nothing expands."""
    if path.startswith(("~", "file:", "local:")):
        raise ValueError(f"{key} {path!r}: give the path itself ({local_path(path)}); the "
                         f"trainers do not expand '~' or read file: or local: URLs")
    # A YAML's `/scratch/$USER/run` is no shell's: the run wrote into a folder named `$USER`.
    if var := _SHELL_VARIABLE.search(path):
        raise ValueError(f"{key} {path!r}: {var.group()} is not expanded in a config; write "
                         f"${{oc.env:{var.group(1)}}} (or the path itself)")
