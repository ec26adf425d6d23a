"""The AR training job's configuration tree (`deepspeed bdt/train.py --config X.yaml k=v`).

    model:       ModelConfig (backbone, head, P, loss weights, activation checkpointing)
    data:        image-tokenizer directory (identity check against shard manifests), buffer
    stages:      progressive stages run as ONE job (SPEC 1.5 / 2: 256 -> 512 -> 1024); each has its
                 shards, length (steps or tokens), LR schedule and micro-batch token budget
    optim:       AdamW (0.9, 0.95), weight decay, gradient clipping (the LR is per stage)
    deepspeed:   ZeRO stage, precision, gradient accumulation; `micro_batch_size` is ignored:
                 a micro-batch is one packed row sized by the stage's token_budget
    checkpoint:  local dir or s3://, every N steps, keep last N (auto-resume from the newest)
    logging:     every N steps to stdout + JSONL + TensorBoard, MFU peak, sample-grid cadence
    fault:       crash injection for recovery tests; leave at 0 in real runs
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bdt.model.config import ModelConfig
from bdt.trainer.deepspeed_config import DeepSpeedConfig, OptimConfig


@dataclass
class StageConfig:
    name: str = "???"
    shards: str = "???"  # token-shard dir, glob, .tar, or an extraction output (index.json)
    family: str = ""  # family inside an extraction manifest ("" = its only one)
    # Train on an extraction whose index.json says complete: false (only its complete shards are
    # listed); off, such a manifest is refused so that a partial dataset is never used by accident.
    allow_incomplete: bool = False
    steps: int = 0  # optimizer steps of this stage; or:
    tokens: int = 0  # budgeted tokens (token_budget x grad_accum x ranks per step), when steps = 0
    token_budget: int = 4096  # packed tokens per micro-batch per rank (whole samples only)
    parallel_num: int = 0  # P of this stage; 0 = model.parallel_num (it must match the model)
    # LR schedule of the stage: linear warmup, then constant or cosine down to min_lr_ratio * lr
    # at the stage's end (SPEC 1.5: AdamW, warmup then constant lr late in training).
    lr: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # constant | cosine
    min_lr_ratio: float = 0.1


@dataclass
class DataConfig:
    # Image tokenizer directory whose codes the shards hold: checked against each manifest's
    # tokenizer sha256 and copied into the export. "" = no identity check.
    tokenizer: str = ""
    # Convenience for YAMLs: stages may say `shards: ${data.root}`, so one command-line override
    # (data.root=s3://...) moves every stage (list items cannot be overridden by key=value).
    root: str = ""
    buffer_size: int = 256  # shuffle/packing buffer per rank, in samples


@dataclass
class CheckpointConfig:
    dir: str = ""  # local dir or s3://...; "" = <run_dir>/checkpoints
    every: int = 1000  # steps; 0 = only at the end and on preemption
    keep_last: int = 3
    resume: bool = True  # auto-resume from the newest complete checkpoint


@dataclass
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    peak_tflops: float = 0.0  # per rank, for MFU; 0 = measure a matmul at start (same run)
    # In-loop sample grid PNG every K steps (0 = off); needs data.tokenizer to decode the bits.
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle", "two blue squares"])
    sample_hw: list[int] = field(default_factory=lambda: [16, 16])  # latent tokens (h, w)
    sample_steps: int = 25  # head sampler steps per AR step
    # Debug: every consumed sample key per rank and step to <run_dir>/sample_keys/ (checks that
    # restarts, also on another number of ranks, neither repeat nor skip data).
    sample_keys: bool = False


@dataclass
class FaultConfig:
    """Crash injection (tests of recovery). A real SIGKILL/SIGTERM of this process at a step."""

    kill_after_checkpoint: int = 0  # SIGKILL right after the complete checkpoint of this step
    kill_during_checkpoint: int = 0  # SIGKILL after the engine files, before the marker
    sigterm_at_step: int = 0  # rank 0 sends itself SIGTERM after this step


@dataclass
class TrainConfig:
    run_dir: str = "???"  # metrics, TensorBoard, resolved config, export (local)
    seed: int = 0
    threads: int = 0  # torch intra-op threads per rank; 0 = leave torch's default
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=list)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # AdamW betas/eps/weight decay and gradient clipping; lr/warmup/schedule here are unused
    # (each stage has its own).
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: bool = True  # write <run_dir>/export (model + tokenizer files) at the end
    fault: FaultConfig = field(default_factory=FaultConfig)


def stage_steps(stage: StageConfig, grad_accum: int, world_size: int) -> int:
    """Optimizer steps of a stage; a token length is converted at the full budget per step."""
    if stage.steps > 0:
        return stage.steps
    per_step = stage.token_budget * grad_accum * world_size
    return max(1, math.ceil(stage.tokens / per_step))


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError naming the first bad key (shards are checked when the job starts)."""
    cfg.model.validate()
    if not cfg.stages:
        raise ValueError("stages: the config lists no training stage")
    names = [s.name for s in cfg.stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stages: names must be unique, got {names}")
    for i, s in enumerate(cfg.stages):
        where = f"stages[{i}] ({s.name})"
        if (s.steps > 0) == (s.tokens > 0):
            raise ValueError(f"{where}: set exactly one of steps and tokens (got steps={s.steps}, "
                             f"tokens={s.tokens})")
        if s.token_budget < 1:
            raise ValueError(f"{where}.token_budget must be >= 1, got {s.token_budget}")
        if s.parallel_num not in (0, cfg.model.parallel_num):
            # P is the head's token count; changing it mid-run is distillation (SPEC 1.4), not
            # a stage switch.
            raise ValueError(f"{where}.parallel_num = {s.parallel_num} differs from "
                             f"model.parallel_num = {cfg.model.parallel_num}: one run trains one P")
    if cfg.logging.sample_every > 0 and not (cfg.data.tokenizer and cfg.logging.sample_prompts):
        raise ValueError("logging.sample_every needs data.tokenizer (to decode the bits) and "
                         "logging.sample_prompts")
    if cfg.checkpoint.every < 0 or cfg.logging.every < 1:
        raise ValueError(f"checkpoint.every must be >= 0 and logging.every >= 1, got "
                         f"{cfg.checkpoint.every} and {cfg.logging.every}")
