"""The AR training loop: DeepSpeed engine, progressive stages, exact resume, preemption, logging.

One step (step.py) = `grad_accum` packed micro-batches per rank. Stages run back to back in one
process (StageClock); the data stream is rebuilt at a stage switch. A checkpoint holds the engine
(DeepSpeed) + per-rank state (checkpoint_state.py). Resume picks the newest complete checkpoint,
lands in its stage with its stream state, and repeats the uninterrupted run bitwise (same world
size and thread count; environment.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bdt.config import save_resolved
from bdt.data.shard_source import check_rank_split
from bdt.training.ar import model_build, reshard, start_checks
from bdt.training.ar.checkpoint_state import restore, save_checkpoint
from bdt.training.ar.config import TrainConfig, validate
from bdt.training.ar.export import export_model
from bdt.training.ar.flops import FlopModel, measure_peak_flops
from bdt.training.ar.init_from import earlier_init_from, resolve_init_from
from bdt.training.ar.stage_rows import StageData
from bdt.training.ar.resume_checks import resume_checks
from bdt.training.ar.stage_stream import stage_rows, stream_seed
from bdt.training.ar.stages import StageClock
from bdt.training.ar.tasks import InLoopTask, run_due, stop_point
from bdt.training.ar.step import train_step
from bdt.training.ar.step_log import LogWindow, log_window_means
from bdt.training.ar.time_fit import TimeFit
from bdt.training.checkpoint import CheckpointManager
from bdt.training.deepspeed_config import build_ds_config, initialize_engine
from bdt.training.distributed import (DistInfo, all_gather_int, all_gather_object, cleanup,
                                      init_distributed)
from bdt.training.divergence import StepHealth, raise_diverged
from bdt.training.ema import EMA
from bdt.training.metrics import MetricsLogger, Throughput, Timer
from bdt.training.model_shapes import (check_model_signature, model_signature,
                                       record_model_signature, text_vocab)
from bdt.training.patient_barrier import patient_barrier
from bdt.training.run_dir import BACKBONE_DIR, checkpoint_root, export_dir, write_summary
from bdt.training.run_lock import hold_run_lock
from bdt.training.signals import (DIVERGED, LOCAL_REASON, STOP_SIGNAL, StopFlag,
                                  StoppedBeforeStart)


log = logging.getLogger(__name__)

# The ranks' tasks, built once the process group exists (which ranks generate depends on it).
InLoopTasks = Callable[[TrainConfig, DistInfo], list[InLoopTask]]

def run(cfg: TrainConfig | DictConfig, in_loop: InLoopTasks) -> dict:
    """Train as configured (every rank calls it); returns a summary of the last step.
    `in_loop(cfg, dist)`: this rank's previews and evaluations (bdt/train.py builds them).
    StoppedBeforeStart for a stop signal before the first step (signals.py)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
    stop, lock = StopFlag(started=False), None
    try:
        resolve_init_from(cfg)
        validate(cfg)
        start_checks.set_threads(cfg.threads)
        start_checks.check_copied_folders(cfg)  # before check_data hashes the tokenizer's files
        data = start_checks.check_data(cfg)  # bad shards / tokenizer mismatch: fail before anything
        start_checks.check_image_tokenizer(cfg)
        model_build.skip_deepspeed_muon(cfg)
        dist = init_distributed()
        # One job per run directory: a second one stops here, naming the holder (run_lock.py).
        lock = hold_run_lock(cfg.run_dir, dist)
        summary = _train(cfg, dist, data, in_loop, stop)
    except BaseException as e:
        stop.settle()  # ending: a stop before step 1 is not raised again in the clean-up
        if isinstance(e, StoppedBeforeStart) and lock is not None:  # a wrapper reads "stopped"
            write_summary(cfg.run_dir, None, stopped=True, timed_out=False, saved_step=None)
            e.recorded = True
        if lock is not None:
            lock.release()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        stop.restore()  # last: a second stop signal until here only sets the flag (not a kill
        raise  # that leaves the summary unwritten and the run lock held)
    cleanup()
    if lock is not None:
        lock.release()
    stop.restore()
    return summary


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train(cfg: TrainConfig, dist: DistInfo, data: start_checks.CheckedData, in_loop: InLoopTasks,
           stop: StopFlag) -> dict:
    sources, tokenizer = data
    # Base LR 1: the stage clock's multiplier is the absolute LR (stages.py).
    ds_config = build_ds_config(replace(cfg.deepspeed, micro_batch_size=1),
                                replace(cfg.optim, lr=1.0), dist.world_size)
    clock = StageClock(cfg.stages, cfg.deepspeed.grad_accum, dist.world_size)
    # DeepSpeed cannot load an engine of another ZeRO stage or precision: refused by name.
    ckpt = CheckpointManager(checkpoint_root(cfg.run_dir, cfg.checkpoint.dir), dist,
                             cfg.checkpoint.keep_last, cfg.checkpoint.staging_dir or None,
                             settings={"deepspeed.zero_stage": cfg.deepspeed.zero_stage,
                                       "deepspeed.precision": cfg.deepspeed.precision})
    ckpt.bind(cfg.run_dir, cfg.checkpoint.adopt)  # another run's checkpoint root: refused here
    _seed_all(cfg.seed)  # identical initialisation on every rank
    model, hf_ds_config = model_build.build_model(cfg, ds_config)  # noqa: F841 (kept: weak ref)
    start_checks.check_budgets(cfg, model, sources)
    # What each rank holds right after the build: under ZeRO-3 its partitions only.
    params_local = all_gather_int(model_build.local_numel(model))
    signature = model_signature(model, text_vocab(model.tokenizer))
    check_model_signature(ckpt.root, signature, dist)
    flop_model = FlopModel.for_model(model)
    if cfg.compile.enabled:
        model.compile_blocks(cfg.compile.backend)
    engine = initialize_engine(model, ds_config, clock)
    ema = EMA(engine.module, cfg.ema_decay) if cfg.ema_decay > 0 else None

    params = {"params": sum(model_build.numel(p) for p in model.parameters()),
              **{f"params_local/rank{r}": n for r, n in enumerate(params_local)}}
    earlier_init = earlier_init_from(cfg.run_dir) if dist.is_main else None
    step, saved_step, stage_idx, stream = 0, -1, -1, None
    seen = {"tokens": 0, "images": 0, "flops": 0.0}  # this rank's
    # The newest checkpoint that verifies and loads; damaged newer ones are reported, skipped.
    resumed = ckpt.resume({"model": engine}, reshard=reshard.resplit_train_states(
        lambda si: sources[si], lambda si: stream_seed(cfg, si)),
        fresh=not cfg.checkpoint.resume,
        before_load=resume_checks(cfg, sources, tokenizer, dist))
    record_model_signature(ckpt.root, signature, dist)  # the checkpoint loaded: the shapes fit
    stream_state, log_window = None, None
    if resumed is not None:
        restored = restore(resumed, ckpt.root, cfg, dist, clock, engine, ema, earlier_init)
        step = saved_step = restored.step
        seen, stream_state, log_window = restored.seen, restored.stream_state, restored.log_window
    else:
        _seed_all(cfg.seed * 1000 + 1 + dist.rank)  # per-rank noise, flips, caption dropout
    # Recorded once the resume's checks passed: a refused config (another ZeRO stage, seed,
    # shards) must not replace the record that sampling the run's checkpoints rebuilds from.
    if dist.is_main:
        save_resolved(cfg, cfg.run_dir)
        model.save_llm_description(os.path.join(cfg.run_dir, BACKBONE_DIR))
    # Opened once the start step is known: what was logged past it is replaced by this run.
    logger = MetricsLogger(cfg.run_dir, dist.is_main, tensorboard=cfg.logging.tensorboard,
                           keep_through_step=step if resumed is not None else -1)
    if resumed is None:
        logger.log(0, params)
        logger.log(0, {"stage": clock.stage})
    else:  # the layout per rank again: the world size may have changed
        logger.log(step, {"resumed_from_step": step, "checkpoints_skipped": len(resumed.skipped),
                          "resumed_from_world_size": restored.world_size,
                          **{k: v for k, v in params.items() if k.startswith("params_local/")}})
        if clock.stage != restored.saved_stage and not clock.finished:  # the config moved it
            logger.log(step, {"stage": clock.stage})

    peak = cfg.logging.peak_tflops * 1e12 or measure_peak_flops(
        torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32)
    zero3 = cfg.deepspeed.zero_stage == 3
    # DeepSpeed reports the global grad norm from its ZeRO/bf16 optimizers only; with plain fp32
    # gradients (ZeRO-0) we read it off the averaged gradients before the step.
    plain_grads = cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.precision == "fp32"
    tasks = in_loop(cfg, dist)
    for task in tasks:
        task.check(model)
    keylog = reshard.SampleKeyLog(cfg.run_dir, dist.rank, dist.world_size,
                                  keep_through_step=step if resumed is not None else -1) \
        if cfg.logging.sample_keys else None
    stop.start()
    health = StepHealth()
    window, meter = LogWindow(**(log_window or {})), Throughput()
    stopped = timed_out = False
    started = time.monotonic()
    time_fit = TimeFit(cfg.time_limit_fit, cfg.time_limit_min, started, clock)
    try:
        while not clock.finished:
            si = clock.stage
            if si != stage_idx:
                stage_idx = si
                if stream is not None:
                    stream.close()  # stops its prefetch worker
                # Every rank checks every rank's share: all stop together, naming the same shards.
                check_rank_split(sources[si], dist.world_size,
                                 f"stages[{si}] ({cfg.stages[si].name})")
                state = stream_state[1:] if stream_state and stream_state[0] == si else None
                stream = StageData(stage_rows(cfg, si, sources[si], model, dist, state),
                                   cfg.data.prefetch, cfg.data.prefetch_worker, dist.device,
                                   cfg.data.stall_s)
                stream_state = None
            with Timer() as t_step:
                data_wait = train_step(cfg, engine, stream, stage_idx, step, clock, window, meter,
                                       health, seen, flop_model, keylog, plain_grads, dist)
            meter.add_data_wait(data_wait)
            norm = engine.get_global_grad_norm()
            health.check_grad_norm(window.grad_norm if norm is None else float(norm))
            if ema is not None:
                ema.update(engine.module)
            window.steps += 1
            step += 1
            if cfg.fault.sigterm_at_step == step and dist.is_main:
                os.kill(os.getpid(), signal.SIGTERM)
            fitted = time_fit.after_step(clock, step, dist.device)
            if fitted:
                logger.log(step, fitted)
            over_time = cfg.time_limit_min > 0 and time.monotonic() - started > \
                cfg.time_limit_min * 60
            why = stop.should_stop(dist.device, local=over_time, diverged=health.bad)
            stopped, timed_out = why == STOP_SIGNAL, why == LOCAL_REASON
            if step % cfg.logging.every == 0 or why or clock.finished:
                # A stop inside a window logs it as partial and saves it: the resumed run goes on
                # with it, and its log (the partial record replaced) reads as uninterrupted.
                partial = step % cfg.logging.every != 0 and not clock.finished
                log_window_means(logger, step, engine, window, meter, stream, seen, peak, dist,
                                 t_step.seconds, partial)
                if not partial:
                    window = LogWindow()
            if clock.stage != stage_idx and not clock.finished:
                # Logged once, by the run that crosses into the stage, before the save that
                # follows: a resume from that checkpoint keeps this record and adds none.
                logger.log(step, {"stage": clock.stage})
            if why == DIVERGED:
                raise_diverged(health, step, saved_step, f"Lower the learning rate (stages."
                               f"{stage_idx}.lr) or look at those samples, then resume.")
            save = stopped or (cfg.checkpoint.at_end and (why or clock.finished)) or \
                (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
            # A stop signal's grace period is short and a due evaluation may be long: the save
            # comes first then (the tasks draw from their own generators, so the checkpoint is
            # the same either way); a kill during the tasks costs their record, no steps.
            if save and stopped:
                saved_step = save_checkpoint(ckpt, engine, step, stage_idx, clock, stream, seen,
                                             cfg, ema, window, tokenizer)
            cut = run_due(tasks, step, lambda: _sampling_weights(ema, engine.module,
                                                                 cfg.compile.enabled),
                          logger, stop_point(stop, dist.device, armed=not stopped))
            if any(every > 0 and step % every == 0
                   for every in (cfg.logging.sample_every, cfg.eval.every)):
                patient_barrier()  # previews are rank 0's alone under ZeRO 0-2
                # A stop signal during the tasks (on any rank; the task running then was cut at
                # its next batch): this step is saved now, not after the tasks and another step.
                if not stopped and stop.should_stop(dist.device) == STOP_SIGNAL:
                    if not (why or step % cfg.logging.every == 0 or clock.finished):
                        log_window_means(logger, step, engine, window, meter, stream, seen, peak,
                                         dist, t_step.seconds, True)  # partial, as above
                    why, stopped, timed_out, save = STOP_SIGNAL, True, False, True
                    if dist.is_main:
                        log.info("stop signal during the in-loop tasks of step %d%s", step,
                                 f": {type(cut).__name__} cut, nothing recorded" if cut else "")
            if save and saved_step != step:
                saved_step = save_checkpoint(ckpt, engine, step, stage_idx, clock, stream, seen,
                                             cfg, ema, window, tokenizer)
            if why:
                if dist.is_main:
                    log.info("%s: %s step %d%s", "stop signal" if stopped else "time limit",
                             "saved" if saved_step == step else "not saving (checkpoint.at_end)",
                             step, "" if stopped else " (finishing early: export follows)")
                break
    finally:
        if stream is not None:
            stream.close()
        if not stopped:  # a signal in the export and summary below ends the process, as before;
            stop.restore()  # a stopped run's summary and lock release are not cut by a second one
        logger.close()
        if keylog:
            keylog.close()
    # A run resumed at its last step builds no stream: its counters are the checkpoint's.
    counters = vars(stream.counters) if stream else \
        dict((stream_state[1] or {}).get("counters", {})) if stream_state else {}
    every_rank = all_gather_object(counters)  # each rank reads its own shards
    summary = {"step": step, "stopped": stopped, "timed_out": timed_out, "saved_step": saved_step,
               "seen": seen, "stream": counters,
               "stream_all_ranks": {k: sum(c.get(k, 0) for c in every_rank) for k in counters}}
    if not stopped:
        summary["param_digests"] = model_build.param_digests(engine.module, zero3)
        if cfg.export:
            with _sampling_weights(ema, engine.module, cfg.compile.enabled):
                export_model(engine, model, cfg, export_dir(cfg.run_dir), dist)
    if dist.is_main:
        write_summary(cfg.run_dir, **summary)
    return summary


@contextlib.contextmanager
def _sampling_weights(ema: EMA | None, module: torch.nn.Module, compiled: bool = False):
    """The weights to sample and export with: the EMA's when there is one. With `compiled`
    layers (compile.enabled) they run eager: those graphs are for the training step's shapes,
    which sampling's KV-cached steps would only recompile."""
    stance = torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()
    with stance, (ema.swapped_in(module) if ema is not None
                  else contextlib.nullcontext(module)) as m:
        yield m

