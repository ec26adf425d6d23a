"""One optimizer step of the AR loop: `grad_accum` packed micro-batches per rank (built ahead by
the stage's prefetch worker, stage_rows.py), each `engine(packed)` -> `engine.backward` ->
`engine.step` (DeepSpeed applies the optimizer at the accumulation boundary), with the losses,
tokens and FLOPs it saw counted."""

from __future__ import annotations

from bdt.training.ar.config import TrainConfig
from bdt.training.ar.flops import FlopModel
from bdt.training.ar.reshard import SampleKeyLog
from bdt.training.ar.stage_rows import StageData
from bdt.training.ar.stages import StageClock
from bdt.training.ar.step_log import LogWindow
from bdt.training.distributed import DistInfo, all_reduce_sum
from bdt.training.divergence import StepHealth, plain_grad_norm
from bdt.training.metrics import Throughput, Timer


def train_step(cfg: TrainConfig, engine, stream: StageData, stage_idx: int, step: int,
               clock: StageClock, window: LogWindow, meter: Throughput, health: StepHealth,
               seen: dict, flop_model: FlopModel, keylog: SampleKeyLog | None,
               plain_grads: bool, dist: DistInfo) -> float:
    """Step `step` + 1's micro-batches; returns the seconds spent waiting for rows. A stage that
    ends on this step's tokens moves the clock on before engine.step. `plain_grads`: read the
    grad norm off the averaged gradients (DeepSpeed reports none for them)."""
    data_wait = 0.0
    step_tokens = 0
    health.reset()
    for micro in range(cfg.deepspeed.grad_accum):
        with Timer() as t_data:
            row = stream.next()  # built ahead by the prefetch worker
            if keylog:
                keylog.add(step + 1, row.keys)
        packed = row.packed
        data_wait += t_data.seconds
        step_tokens += row.tokens
        # One row length per stage: flex compiles once (bdt.model.attention).
        losses = engine(packed, row_len=cfg.stages[stage_idx].token_budget)
        engine.backward(losses["total"])
        if engine.is_gradient_accumulation_boundary():
            if plain_grads:
                window.grad_norm = plain_grad_norm(engine.module)
            # Before engine.step, which has the clock compute the next step's LR:
            # a stage that ends with this step hands that LR to the next stage.
            clock.add_tokens(all_reduce_sum(step_tokens, dist.device))
            if clock.stage_done(step + 1):
                clock.advance(step + 1)
        window.lr = engine.get_lr()[0]  # this step's LR: engine.step moves it on
        engine.step()
        n_img = packed.num_samples
        flops = flop_model.packed_flops(packed)
        window.flops += flops
        seen["flops"] += flops
        terms = {"loss": losses["total"].item(), "text_ce": float(losses["text_ce"]),
                 "vision": float(losses["vision"])}
        health.check_losses(terms, f"micro-batch {micro} of stage "
                            f"{cfg.stages[stage_idx].name}", row.keys)
        window.add({**terms, "bit_accuracy": float(losses["bit_accuracy"])})
        seen["tokens"] += row.tokens
        seen["images"] += n_img
        meter.add_step(n_img, row.tokens)
    return data_wait
