"""The per-rank state an AR checkpoint holds next to the engine: step, stage clock, tokens and
images seen, the stream's position and buffer, the log window, the image tokenizer's record.
Written at a save, read back and checked at a resume (reshard.py splits it anew for another
world size)."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import torch

from bdt.training.ar.config import TrainConfig
from bdt.training.ar.run_tokenizer import META_KEY, RunTokenizer
from bdt.training.ar.stages import StageClock
from bdt.training.ar.step_log import LogWindow
from bdt.training.checkpoint import CheckpointManager
from bdt.training.checkpoint_load import Resumed
from bdt.training.distributed import DistInfo
from bdt.training.ema import EMA

log = logging.getLogger(__name__)


def save_checkpoint(ckpt: CheckpointManager, engine, step: int, stage_idx: int, clock: StageClock,
                    stream, seen: dict, cfg: TrainConfig, ema: EMA | None, window: LogWindow,
                    tokenizer: RunTokenizer | None) -> int:
    """Collective: checkpoint `step`; returns it."""
    stream_meta, stream_tensors = stream.state_dict()
    # "stage" is the stage whose stream this is; after a stage's last step the clock is
    # already in the next one (whose stream starts fresh on resume).
    meta = {"step": step, "threads": torch.get_num_threads(), "seed": cfg.seed, "stage": stage_idx,
            "stage_name": cfg.stages[stage_idx].name, "clock": clock.state_dict(), "seen": seen,
            "stream": stream_meta, "log_window": window.state_dict(),
            META_KEY: tokenizer.record() if tokenizer else None}
    tensors = {f"stream.{k}": v for k, v in stream_tensors.items()}
    # fault.kill_during_checkpoint: every file is written, then the ranks die before the marker.
    die = (lambda: os.kill(os.getpid(), signal.SIGKILL)) \
        if cfg.fault.kill_during_checkpoint == step else None
    ckpt.save(step, {"model": engine}, meta, tensors,
              shared={"ema": ema.state_dict()} if ema is not None else None, before_marker=die)
    if cfg.fault.kill_after_checkpoint == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return step


@dataclass
class Restored:
    """Where a resumed run stands, as its checkpoint recorded it."""
    step: int
    seen: dict  # this rank's tokens, images and flops
    stream_state: tuple  # (stage, stream meta, tensors) of the checkpoint's stream
    log_window: dict | None  # the partial log window (None: none kept)
    saved_stage: int  # the clock's stage as saved, before the config's stage lengths moved it
    world_size: int  # of the run that wrote it, before a resplit


def restore(resumed: Resumed, root: str, cfg: TrainConfig, dist: DistInfo, clock: StageClock,
            engine, ema: EMA | None, earlier_init: str | None) -> Restored:
    """Load a checkpoint's per-rank state into the clock, LR and EMA. What would not continue
    the run it resumes (no stage clock, no EMA, another seed, shards or tokenizer) was refused
    before the checkpoint loaded (resume_checks.py)."""
    resume, meta, tensors, shared = resumed.tag, resumed.meta, resumed.tensors, resumed.shared
    step = int(meta["step"])
    seen = {"flops": 0.0, **meta["seen"]}  # checkpoints before flops were counted lack it
    clock.load_state_dict(meta["clock"])
    saved_stage = clock.stage
    clock.resume_at(step)  # the config's stage lengths, which may have changed since
    engine.lr_scheduler.write_lrs()  # the config's LR at the restored position (schedule.py)
    if ema is not None:
        ema.load_state_dict(shared["ema"])
    elif shared and "ema" in shared and dist.is_main:
        log.warning("checkpoint %s/%s holds EMA weights that ema_decay=0 drops: later "
                    "checkpoints and the export hold the live weights", root, resume)
    stream_state = (meta["stage"], meta["stream"], {"buffer_bits": tensors["stream.buffer_bits"]})
    log_window = meta.get("log_window")  # absent before windows were kept, None after a resplit
    if meta.get("threads") != torch.get_num_threads():
        # environment.md: a different intra-op thread count changes float reduction order.
        log.warning("checkpoint written with %s torch threads, this run has %d: training "
                    "continues, but not bitwise as the uninterrupted run would (set "
                    "`threads`)", meta.get("threads"), torch.get_num_threads())
    if dist.is_main:
        log.info("resumed from %s/%s (stage %s)", root, resume,
                 clock.names[min(clock.stage, len(clock.names) - 1)])
        if earlier_init is not None and earlier_init != cfg.init_from:
            log.warning("init_from=%s (the last start had %r) is not loaded: the run resumed "
                        "from its checkpoint %s, whose weights continue it. To start from "
                        "init_from, give the run a new run_dir", cfg.init_from or "''",
                        earlier_init, resume)
    return Restored(step, seen, stream_state, log_window, saved_stage,
                    meta.get("resplit_from_world_size", dist.world_size))
