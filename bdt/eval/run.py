"""Score a model on the shapes suite (issue 7 part 2): generate, judge, write the report.

`evaluate(model, decoder, items, ...)` is the whole job and takes live modules, so the trainer can
call it every K steps on `engine.module`; `bdt eval` loads an export and calls it. Judging is a
separate step (`judge_items`) so a test can feed ground-truth renders through the same scoring.

Report files in `out_dir`: images/<id>.png, eval.json (scores per category and overall, images/s,
settings, and every item's verdict), eval.md (the table) and grid.png (green frame = passed).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence

from PIL import Image

from bdt import storage
from bdt.eval.judge import judge_image, score
from bdt.generation.grid import make_grid
from bdt.generation.sampling import SamplingConfig


def select(suite: list[dict], categories: Sequence[str] = (), per_category: int = 0) -> list[dict]:
    """A subset of the suite, in suite order: only `categories` (all when empty), the first
    `per_category` of each (all when 0)."""
    known = sorted({item["category"] for item in suite})
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; the suite has {known}")
    taken: dict[str, int] = {}
    out = []
    for item in suite:
        c = item["category"]
        full = per_category and taken.get(c, 0) >= per_category
        if (categories and c not in categories) or full:
            continue
        taken[c] = taken.get(c, 0) + 1
        out.append(item)
    if not out:
        raise ValueError("the selection holds no prompt")
    return out


def judge_items(items: Sequence[dict], images: Sequence[Image.Image]) -> dict:
    """Judge image i against items[i]["spec"]: the scores plus one verdict per item."""
    if len(items) != len(images):
        raise ValueError(f"{len(images)} images for {len(items)} suite items")
    judgements = [judge_image(im, item["spec"]) for item, im in zip(items, images)]
    result = score(judgements, [item["category"] for item in items])
    result["items"] = [{"id": item["id"], "category": item["category"], "prompt": item["prompt"],
                        "passed": j.passed, "reason": j.reason, "attributes": j.attributes}
                       for item, j in zip(items, judgements)]
    return result


def evaluate(model, decoder, items: Sequence[dict], width: int = 128, height: int = 128,
             sampling: SamplingConfig | None = None, batch: int = 8, out_dir: str | None = None,
             progress: bool = False, any_bucket: bool = True, cols: int = 8,
             make_images: Callable | None = None) -> dict:
    """Generate one image per suite item, judge it, and (with `out_dir`) write the report.
    Returns the scores: overall, per_category, counts, images_per_s, items. `make_images(trained,
    prompts, width, height, sampling, batch)` makes the images instead of TrainedModel.images
    (the trainer shares the batches among its ranks)."""
    from bdt.generation.trained import TrainedModel

    trained = model if isinstance(model, TrainedModel) else TrainedModel(model, decoder)
    sampling = sampling or SamplingConfig()
    prompts = [item["prompt"] for item in items]
    t0 = time.perf_counter()
    images = trained.images(prompts, width, height, sampling, batch=batch, any_bucket=any_bucket,
                            progress=progress, desc="eval") if make_images is None else \
        make_images(trained, prompts, width, height, sampling, batch)
    seconds = time.perf_counter() - t0
    result = judge_items(items, images)
    result.update(num_images=len(images), seconds=round(seconds, 3),
                  images_per_s=round(len(images) / max(seconds, 1e-9), 4), width=width,
                  height=height, parallel_num=trained.model.cfg.parallel_num,
                  cfg_scale=sampling.cfg_scale, cfg_schedule=sampling.cfg_schedule,
                  steps=sampling.num_steps, seed=sampling.seed, batch=batch)
    if out_dir is not None:
        write_report(result, images, out_dir, cols)
    return result


def write_report(result: dict, images: Sequence[Image.Image], out_dir: str, cols: int = 8) -> None:
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    for item, image in zip(result["items"], images):
        item["file"] = f"images/{item['id']}.png"
        image.save(os.path.join(out_dir, item["file"]))
    make_grid(images, cols=cols, marks=[item["passed"] for item in result["items"]]
              ).save(os.path.join(out_dir, "grid.png"))
    with open(os.path.join(out_dir, "eval.md"), "w") as f:
        f.write(markdown_table(result))
    # eval.json last and whole (temp + rename): its presence means the report is complete
    # (scripts/demo.sh skips its eval on it), so a kill must not leave half of one.
    storage.write_bytes_atomic(os.path.join(out_dir, "eval.json"),
                               json.dumps(result, indent=1).encode())


def markdown_table(result: dict) -> str:
    """Per-category accuracy, overall (mean over categories, GenEval-style), and throughput."""
    lines = ["| category | passed | images | accuracy |", "|---|---:|---:|---:|"]
    for c, acc in result["per_category"].items():
        n = result["counts"][c]
        lines.append(f"| {c} | {round(acc * n)} | {n} | {acc:.3f} |")
    lines.append(f"| **overall** (mean of categories) | | {sum(result['counts'].values())} | "
                 f"**{result['overall']:.3f}** |")
    if result.get("per_attribute"):
        lines += ["", "| attribute (judged alone) | passed | images | accuracy |",
                  "|---|---:|---:|---:|"]
        for a, acc in result["per_attribute"].items():
            n = result["attribute_counts"][a]
            lines.append(f"| {a} | {round(acc * n)} | {n} | {acc:.3f} |")
    settings = ", ".join(f"{k} {result[k]}" for k in ("width", "height", "parallel_num",
                                                      "cfg_scale", "steps", "seed")
                         if k in result)
    if "images_per_s" in result:
        lines += ["", f"{result['images_per_s']:.3f} images/s ({settings})"]
    return "\n".join(lines) + "\n"
