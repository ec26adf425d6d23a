"""In-loop evaluation (system §5: loss is a poor proxy): every `eval.every` steps the model being
trained generates the shapes suite (a few prompts per category), the pixel judge scores the
images, and the scores go to the metrics (log, JSONL, TensorBoard) with the full report
(`bdt.eval.run.write_report`) under <run_dir>/eval/step_N/.

Generation is deterministic from `seed` (sampler and decoder generators; no global RNG draw)
and runs without gradients in eval mode, so an evaluation does not change the training run it
observes. Every rank takes part. Under ZeRO-3 every forward pass is collective (parameters are
gathered), so all ranks make all the images. Otherwise rank r makes batches r, r + W, ..., then
each batch goes to the other ranks (`shared_images`: the images one process would make), so an
evaluation takes 1/W of the time and no rank waits for another longer than a batch (rank 0
evaluating alone kept the others waiting in their next collective, which a long evaluation at
scale could hold past the process group's timeout, 10 minutes). Rank 0 writes the report.

A stop signal during an evaluation ends it at its next round of batches, on every rank at the
same one (the loop's stop point, one all-reduce a round): the run saves its step within a
cluster's grace period instead of after the whole suite. A cut evaluation records nothing (its
report was staged: no folder is left), as its first categories would not score as the suite.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from bdt import output_dirs
from bdt.eval.run import evaluate, select
from bdt.eval.suite import load_suite
from bdt.generation.sampling import SamplingConfig, check_prompts
from bdt.generation.trained import TrainedModel, batches
from bdt.training.ar.config import EvalConfig


class InLoopEval:
    """An in-loop task of the AR loop (bdt.training.ar.tasks.InLoopTask)."""

    def __init__(self, cfg: EvalConfig, decoder, run_dir: str, seed: int, collective: bool,
                 writes: bool):
        """`decoder`: the image tokenizer (loaded once for previews and evaluation). `collective`:
        the model's forward passes are (ZeRO-3): every rank makes every image."""
        self.cfg, self.run_dir, self.seed, self.writes = cfg, run_dir, seed, writes
        self.active = cfg.every > 0
        if not self.active:
            return
        self.items = select(load_suite(), list(cfg.categories), cfg.per_category)
        self.decoder = decoder
        self.share = not collective and dist.is_initialized()

    def due(self, step: int) -> bool:
        return self.active and step % self.cfg.every == 0

    def check(self, model: torch.nn.Module) -> None:
        if self.active:
            factor = self.decoder.downsample_factor
            check_prompts(model, [item["prompt"] for item in self.items],
                          self.cfg.height // factor, self.cfg.width // factor)

    def run(self, step: int, module: torch.nn.Module,
            stop_point: Callable[[bool], None]) -> dict[str, float]:
        """Scores of the suite subset at this step (metrics keys) and, on the writing rank, the
        report files. `stop_point(True)` before each round of batches, on every rank: what it
        raises ends the evaluation, the report left unwritten."""
        c = self.cfg
        make_images = functools.partial(shared_images, before_batch=lambda: stop_point(True),
                                        share=self.share)
        # Staged: a step evaluated again (resumed from before it, maybe with other eval settings)
        # replaces its report whole, images/ included, rather than mixing the two.
        report = output_dirs.staged_dir(os.path.join(self.run_dir, "eval", f"step_{step:09d}"),
                                        overwrite=True, last="eval.json") \
            if self.writes else contextlib.nullcontext(None)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad(), report as out_dir:
                result = evaluate(module, self.decoder, self.items, c.width, c.height,
                                  SamplingConfig(cfg_scale=c.cfg_scale, num_steps=c.steps,
                                                 seed=self.seed), batch=c.batch, out_dir=out_dir,
                                  make_images=make_images)
        finally:
            module.train(was_training)
        return {"eval_overall": result["overall"], "eval_images_per_s": result["images_per_s"],
                **{f"eval/{k}": v for k, v in result["per_category"].items()},
                **{f"eval_attr/{k}": v for k, v in result["per_attribute"].items()}}


def shared_images(trained: TrainedModel, prompts: Sequence[str], width: int, height: int,
                  sampling: SamplingConfig, batch: int, before_batch: Callable[[], None],
                  share: bool = True) -> list[Image.Image]:
    """TrainedModel.images(prompts, ...) made by every rank of the process group together: rank
    r makes batches r, r + W, ..., then each batch goes from its rank to the others as uint8
    pixels, one batch at a time (an all-gather of one batch per rank held W batches on the
    device, mostly padding where the suite has fewer batches than ranks), and every rank
    returns all images. No rank waits for another longer than a batch: their shares differ by
    one at most. Every rank calls `before_batch()` before each round of W batches, the same
    number of times (a rank without a batch in the last round too). `share=False`: this rank
    makes every batch (ZeRO-3, where every forward pass is collective: all ranks do)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if share else (0, 1)
    h, w = trained.token_grid(width, height, any_bucket=True)
    f = trained.decoder.downsample_factor
    todo = batches(prompts, batch)
    made = {}
    rounds = -(-len(todo) // world)  # of one batch per rank
    for k in range(rank, rounds * world, world):
        before_batch()
        if k < len(todo):
            made[k] = trained.batch_images(k, todo[k], h, w, sampling)
    if world == 1:
        return [image for k in range(len(todo)) for image in made[k]]
    images: list[Image.Image] = []
    for k, chunk in enumerate(todo):
        pixels_BHWC = torch.stack([torch.from_numpy(np.asarray(image)) for image in made[k]]) \
            if k in made else torch.empty(len(chunk), h * f, w * f, 3, dtype=torch.uint8)
        # on the model's device: NCCL sends CUDA tensors only
        pixels_BHWC = pixels_BHWC.to(trained.device)
        dist.broadcast(pixels_BHWC, src=k % world)
        images += [Image.fromarray(p.numpy(), "RGB") for p in pixels_BHWC.cpu()]
    return images
