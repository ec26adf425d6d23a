"""`bdt model init-tiny`: the embedded default's small "pretrained" LLM (system §4), made from a
config and a SentencePiece tokenizer trained on the dataset's captions
(`bdt.model.backbone.make_tiny_llm`). Training then loads it like any downloaded LLM.

`bdt model import-bitdance`: a released BitDance model folder as a bdt export
(`bdt.generation.bitdance_release`), for `bdt sample`, `bdt eval` and fine-tuning (`init_from`)."""

from __future__ import annotations

import argparse
import json
import logging
import os

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="make model files")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    p = sub.add_parser(
        "init-tiny", help="write a small randomly initialised LLM + caption tokenizer",
        description="Train a SentencePiece tokenizer on the captions (KEY.txt members) of the "
                    "webdataset tars in --captions-from and save it with a random small causal "
                    "LM as a Hugging Face model directory.")
    p.add_argument("--captions-from", required=True,
                   help="directory of raw webdataset tars (e.g. `bdt data shapes --out` output)")
    p.add_argument("--out", required=True, help="output model directory (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing the files of the same names")
    p.add_argument("--arch", default="qwen3", choices=["qwen3", "qwen2", "llama"])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=384)
    p.add_argument("--max-positions", type=int, default=1024)
    p.add_argument("--max-captions", type=int, default=20000, help="captions read at most")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_init_tiny)
    p = sub.add_parser(
        "import-bitdance", help="convert a released BitDance model folder into a bdt export",
        description="Read a released BitDance text-to-image folder (Hugging Face LLM files + "
                    "ae_config.json, ae.safetensors, vision_head_config.json, "
                    "vision_head.safetensors, projector.safetensors; or its diffusers port: "
                    "model_index.json, text_encoder/, tokenizer/, autoencoder/, diffusion_head/, "
                    "projector/; any weights file may be sharded as NAME.safetensors.index.json "
                    "+ its shards), check every weight against "
                    "the configs, and write the export layout bdt/train.py writes: `bdt sample "
                    "--model OUT` samples it, and a training run fine-tunes it with init_from=OUT. "
                    "The LLM's files are hard-linked where possible, else copied.")
    p.add_argument("--src", required=True, help="the released folder (local or fsspec URL)")
    p.add_argument("--out", required=True, help="output export directory (new or empty)")
    p.set_defaults(func=_import_bitdance)


def read_captions(root: str, limit: int) -> list[str]:
    """The `.txt` captions of the tars under `root`, in shard order, at most `limit`. Only
    captions are read (images are stepped over, a caption over the token readers' limit too);
    one that is not UTF-8, shows nothing or holds a control character is skipped with a warning
    naming it, as extraction would reject it."""
    import glob

    from bdt.data.tars import log_skip, read_samples
    from bdt.data.token_shards import MAX_CAPTION_BYTES, caption_problem, caption_text

    urls = sorted(glob.glob(os.path.join(root, "*.tar")))
    if not urls:
        raise OSError(f"--captions-from {root!r} holds no .tar shards")
    captions: list[str] = []
    skipped = 0
    only_captions = lambda ext: MAX_CAPTION_BYTES if ext == "txt" else 0  # noqa: E731
    for url in urls:
        for sample in read_samples(url, max_bytes=only_captions):
            raw = sample.members.get("txt")
            if raw is None:
                continue
            try:
                text = caption_text(raw)
                problem = caption_problem(text)
            except UnicodeDecodeError as e:
                problem = ("caption_not_utf8", str(e))
            if problem is not None:
                skipped += 1
                log_skip(log, skipped, 10, "skipping the caption of sample %s in %s: %s %s",
                         sample.key, url, *problem)
                continue
            captions.append(text)
            if len(captions) >= limit:
                return captions
    if not captions:
        raise ValueError(f"the tars in {root!r} hold no usable .txt captions ({skipped} skipped)")
    return captions


def check_tiny_args(args: argparse.Namespace) -> None:
    """Sizes every architecture can be built and run with (ValueError naming the flag)."""
    for flag in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab_size",
                 "max_positions", "max_captions"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.seed < 2**32:  # torch and SentencePiece seeds
        raise ValueError(f"--seed must be in [0, 2^32), got {args.seed}")
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.hidden % (2 * args.heads):  # RoPE rotates pairs: an even head dimension
        raise ValueError(f"--hidden {args.hidden} must be a multiple of 2 x --heads {args.heads} "
                         f"(an even head dimension)")


def check_new_output(args: argparse.Namespace) -> None:
    """Refuse, before any work, an --out that is not a directory, or a non-empty one unless
    --overwrite (FileExistsError)."""
    from bdt import output_dirs

    output_dirs.refuse_nonempty_dir(args.out, "give a new or empty directory, or pass --overwrite "
                                          "to replace the files it writes", args.overwrite)


def _init_tiny(args: argparse.Namespace) -> int:
    from bdt import output_dirs
    from bdt.model.backbone import make_tiny_llm

    check_tiny_args(args)
    check_new_output(args)
    captions = read_captions(args.captions_from, args.max_captions)
    # Staged: a killed run leaves no half model that a rerun would have to --overwrite; the
    # weights move in last (scripts/demo.sh skips the step on them).
    with output_dirs.staged_dir(args.out, overwrite=args.overwrite, last="model.safetensors") as tmp:
        make_tiny_llm(tmp, captions, arch=args.arch, hidden=args.hidden, layers=args.layers,
                      heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate,
                      vocab_size=args.vocab_size, max_position_embeddings=args.max_positions,
                      seed=args.seed)
        with open(os.path.join(tmp, "config.json")) as f:  # few captions make fewer pieces
            tokens = json.load(f)["vocab_size"]
    print(f"wrote a {args.arch} LLM ({args.layers} layers, hidden {args.hidden}) and a caption "
          f"tokenizer of {tokens} tokens (--vocab-size {args.vocab_size}) from {len(captions)} "
          f"captions to {args.out}")
    return 0


def _import_bitdance(args: argparse.Namespace) -> int:
    from bdt.generation.bitdance_release import import_release

    cfg = import_release(args.src, args.out)
    print(f"wrote {args.out}: P = {cfg.parallel_num}, head {cfg.head.width} wide x "
          f"{cfg.head.depth} blocks, {cfg.head.bits}-bit tokens, LLM in {cfg.backbone.dtype}")
    return 0
