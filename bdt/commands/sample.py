"""`bdt sample`: prompts -> PNG files + a grid, from a training export or run dir."""

from __future__ import annotations

import argparse
import json
import math
import os


def add_sampling_args(p: argparse.ArgumentParser, batch: int) -> None:
    """Options shared by `bdt sample` and `bdt eval`."""
    p.add_argument("--model", required=True,
                   help="training export (<run_dir>/export), run dir (its export, else its "
                        "newest complete checkpoint) or checkpoint dir (<run_dir>/checkpoints/"
                        "step_N)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", type=int, help="square side in px (default 128)")
    size.add_argument("--bucket", metavar="WxH", help="width x height in px, e.g. 96x64")
    p.add_argument("--any-bucket", action="store_true",
                   help="allow a bucket the training shards did not hold")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance (4.0)")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], default="constant")
    p.add_argument("--steps", type=int, default=25, help="head sampler steps per AR step (25)")
    p.add_argument("--parallel", type=int, default=0, metavar="P",
                   help="tokens per AR step; fixed by the trained model (0 = the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=batch, help=f"prompts per forward ({batch})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (auto)")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing the files of the same names")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample", help="generate images from prompts with a trained model",
        description="Generate one PNG per prompt (out/NNNN.png), a grid (out/grid.png) and "
                    "out/samples.json (prompt -> file and the settings).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts-file", help="text file, one prompt per line")
    add_sampling_args(p, batch=8)
    p.add_argument("--cols", type=int, default=8, help="grid columns (8)")
    p.set_defaults(func=_sample)


# A prompts or suite file larger than this is refused, read no further: every line is an image
# to sample (a million prompts of 64 bytes; the shipped suite is 60 KB), so a larger one is
# the wrong file (/dev/zero, a FIFO that never ends) and reading it whole would exhaust memory.
MAX_TEXT_BYTES = 64 << 20


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file of at most MAX_TEXT_BYTES (a FIFO too: read, not
    stat-ed); a file that is not text names itself. Lines end at a newline only (\r\n and \r
    read as one): str.splitlines also splits at U+2028, a form feed and others, which a prompt
    may hold and JSON writes unescaped (a suite item cut in two)."""
    with open(path, "rb") as f:
        data = f.read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        raise ValueError(f"{path}: larger than {MAX_TEXT_BYTES >> 20} MiB, more than a prompt "
                         f"list holds: give a file of one prompt (suite item) per line")
    try:
        text = data.decode("utf-8-sig")  # -sig: an editor's byte-order mark is no text
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def read_prompts(path: str) -> list[tuple[int, str]]:
    """(line number from 1, prompt) of each non-blank line of prompts file `path`."""
    prompts = [(n, line.strip()) for n, line in enumerate(read_lines(path), 1) if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path!r} holds no prompt (one per line)")
    return prompts


def given_prompts(prompts: list[str]) -> list[str]:
    """--prompt values, stripped as prompt-file lines are; an empty one is refused (it would
    sample an unconditioned image under a prompt's name)."""
    stripped = [p.strip() for p in prompts]
    empty = [i for i, p in enumerate(stripped) if not p]
    if empty:
        raise ValueError(f"--prompt number {empty[0] + 1} is empty")
    return stripped


MAX_STEPS = 10_000  # head sampler steps; the release samples with 50 at most


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**63:  # numpy SeedSequence entropy; batch seeds are drawn from it
        raise ValueError(f"--seed must be in [0, 2^63), got {seed}")


def check_sampling_args(args: argparse.Namespace) -> None:
    """Refuse values no sampling can use before the model loads (ValueError naming the flag)."""
    if not (1 <= args.steps <= MAX_STEPS and args.batch >= 1):
        raise ValueError(f"--steps must be in [1, {MAX_STEPS}] and --batch >= 1, got "
                         f"{args.steps} and {args.batch}")
    if not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        raise ValueError(f"--cfg-scale must be a finite number >= 0 (1 = no guidance), "
                         f"got {args.cfg_scale}")
    # P = ps * ps tokens per step; whether it is the model's is checked once the model loads.
    if args.parallel < 0 or math.isqrt(args.parallel) ** 2 != args.parallel:
        raise ValueError(f"--parallel must be 0 (the model's P) or a perfect square, got "
                         f"{args.parallel}")
    check_seed(args.seed)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a file; give a directory")


def load_for_args(args: argparse.Namespace):
    """(TrainedModel, (W, H), SamplingConfig) from the shared options; user errors raise."""
    from bdt.generation.sampling import SamplingConfig
    from bdt.generation.load import load_trained, pick_device
    from bdt.generation.trained import parse_bucket

    check_sampling_args(args)
    size = parse_bucket(args.bucket or str(128 if args.size is None else args.size))
    trained = load_trained(args.model, pick_device(args.device))
    P = trained.model.cfg.parallel_num
    if args.parallel not in (0, P):
        raise ValueError(f"--parallel {args.parallel}: the model was trained with P = {P} tokens "
                         f"per step (P is fixed by the trained head)")
    trained.token_grid(*size, any_bucket=args.any_bucket)  # fail before the slow part
    sampling = SamplingConfig(cfg_scale=args.cfg_scale, cfg_schedule=args.cfg_schedule,
                              num_steps=args.steps, seed=args.seed)
    return trained, size, sampling


def _sample(args: argparse.Namespace) -> int:
    from bdt import output_dirs
    from bdt.commands.model import check_new_output
    from bdt.generation.grid import make_grid
    from bdt.generation.sampling import PromptError

    if args.cols < 1:
        raise ValueError(f"--cols must be >= 1, got {args.cols}")
    numbered = (list(enumerate(given_prompts(args.prompt), 1)) if args.prompt
                else read_prompts(args.prompts_file))
    prompts = [prompt for _, prompt in numbered]
    check_sampling_args(args)
    check_new_output(args)  # before the model loads
    trained, (width, height), sampling = load_for_args(args)
    files = [{"file": f"{i:04d}.png", "prompt": prompt} for i, prompt in enumerate(prompts)]
    meta = {"model": trained.source, "width": width, "height": height,
            "parallel_num": trained.model.cfg.parallel_num, "cfg_scale": sampling.cfg_scale,
            "cfg_schedule": sampling.cfg_schedule, "steps": sampling.num_steps,
            "seed": sampling.seed, "batch": args.batch, "images": files}
    # Staged before the work, as eval: a second sampler of the same --out fails at its start.
    with output_dirs.staged_dir(args.out, overwrite=args.overwrite, last="samples.json") as tmp:
        try:
            images = trained.images(prompts, width, height, sampling, batch=args.batch,
                                    any_bucket=args.any_bucket)
        except PromptError as e:  # named as the user gave it: a file's line, as an editor shows
            where = f"{args.prompts_file} line" if args.prompts_file else "--prompt number"
            raise ValueError(f"{where} {numbered[e.index][0]}: {e.reason}") from None
        for image, entry in zip(images, files):
            image.save(os.path.join(tmp, entry["file"]))
        make_grid(images, cols=args.cols).save(os.path.join(tmp, "grid.png"))
        with open(os.path.join(tmp, "samples.json"), "w") as f:
            json.dump(meta, f, indent=1)
    print(f"wrote {len(images)} image(s) of {width}x{height} and grid.png to {args.out}")
    return 0
