"""Config sections both trainers share, so that both speak one vocabulary: `run_dir`,
`checkpoint:` and `logging:` mean the same thing in an AR and a tokenizer training config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    dir: str = ""  # local dir or s3://...; "" = <run_dir>/checkpoints
    every: int = 1000  # optimizer steps; 0 = only at the end and on preemption
    keep_last: int = 3
    resume: bool = True  # auto-resume from the newest complete checkpoint that verifies
    staging_dir: str = ""  # local staging for a remote dir ("" = under the system temp dir)
    # The run id (RUN_ID) of another run whose checkpoint dir this run takes over on purpose, to
    # continue or fork from its checkpoints; that run can then no longer save there.
    adopt: str = ""


@dataclass
class LoggingConfig:
    every: int = 10  # steps between metric records (the log, JSONL, TensorBoard)
    tensorboard: bool = True

