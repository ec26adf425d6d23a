"""In-loop evaluation (system §5: loss is a poor proxy): every `eval.every` steps the model being
trained generates the shapes suite (a few prompts per category), the pixel judge scores the
images, and the scores go to the metrics (log, JSONL, TensorBoard) with the full report
(`bdt.eval.run.write_report`) under <run_dir>/eval/step_N/.

Generation is deterministic from `seed` (sampler and decoder generators; no global RNG draw)
and runs without gradients in eval mode, so an evaluation does not change the training run it
observes. Under ZeRO-3 every rank joins the forward passes (their parameters are gathered
collectively) and all ranks produce the same images; otherwise rank 0 alone evaluates and the
others wait at the next collective.
"""

from __future__ import annotations

import contextlib
import os

import torch

from bdt import output_dirs
from bdt.eval.run import evaluate, select
from bdt.eval.suite import load_suite
from bdt.generation.sampling import SamplingConfig, check_prompts
from bdt.training.ar.config import EvalConfig


class InLoopEval:
    """An in-loop task of the AR loop (bdt.training.ar.loop.InLoopTask)."""

    def __init__(self, cfg: EvalConfig, decoder, run_dir: str, seed: int, takes_part: bool,
                 writes: bool):
        """`decoder`: the image tokenizer (loaded once for previews and evaluation); unused when
        this rank does not take part."""
        self.cfg, self.run_dir, self.seed, self.writes = cfg, run_dir, seed, writes
        self.active = cfg.every > 0 and takes_part
        if not self.active:
            return
        self.items = select(load_suite(), list(cfg.categories), cfg.per_category)
        self.decoder = decoder

    def due(self, step: int) -> bool:
        return self.active and step % self.cfg.every == 0

    def check(self, model: torch.nn.Module) -> None:
        if self.active:
            factor = self.decoder.downsample_factor
            check_prompts(model, [item["prompt"] for item in self.items],
                          self.cfg.height // factor, self.cfg.width // factor)

    def run(self, step: int, module: torch.nn.Module) -> dict[str, float]:
        """Scores of the suite subset at this step (metrics keys) and, on the writing rank, the
        report files."""
        c = self.cfg
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
                                                 seed=self.seed), batch=c.batch, out_dir=out_dir)
        finally:
            module.train(was_training)
        return {"eval_overall": result["overall"], "eval_images_per_s": result["images_per_s"],
                **{f"eval/{k}": v for k, v in result["per_category"].items()},
                **{f"eval_attr/{k}": v for k, v in result["per_attribute"].items()}}
