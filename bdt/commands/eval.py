"""`bdt eval`: generate the shapes suite (or a subset) with a trained model and judge it."""

from __future__ import annotations

import argparse
import json
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    from bdt.commands.sample import add_sampling_args

    p = subparsers.add_parser(
        "eval", help="score a trained model on the shapes evaluation suite",
        description="Generate one image per suite prompt, judge each against its spec, and write "
                    "eval.json, eval.md (table), grid.png (green/red = pass/fail) and images/.")
    p.add_argument("--suite", help="JSONL of suite items (id, category, prompt, spec); default: "
                                   "the shipped bdt/eval/suite.jsonl (240 prompts)")
    p.add_argument("--categories", nargs="+", default=[], help="only these categories")
    p.add_argument("--per-category", type=int, default=0,
                   help="first N prompts of each category (0 = all)")
    add_sampling_args(p, batch=16)
    p.set_defaults(func=_eval)


def _read_suite(path: str) -> list[dict]:
    from bdt.commands.sample import read_lines

    items, ids = [], set()
    for n, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            _check_item(item, ids)
        except (ValueError, TypeError, KeyError, RecursionError) as e:  # Recursion: nesting
            raise ValueError(f"{path}:{n}: not a suite item ({str(e)[:200]})") from None
        items.append(item)
        ids.add(item["id"])
    if not items:
        raise ValueError(f"suite file {path!r} holds no item")
    return items


NAME_MAX = 255  # bytes of a file name (Linux, macOS)


def _check_item(item: dict, seen_ids: set[str]) -> None:
    """One suite item; its id names its image file (images/<id>.png), so it must be unique
    and a plain file name."""
    from bdt.data.shapes import check_spec

    if not isinstance(item, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in ("id", "category", "prompt", "spec") if k not in item]
    if missing:
        raise ValueError(f"missing keys {missing}")
    if not all(isinstance(item[k], str) and item[k].strip() for k in ("id", "category", "prompt")):
        raise ValueError("id, category and prompt must be non-empty strings")
    name = item["id"]
    if name in seen_ids or os.path.basename(name) != name or name in (".", ".."):
        raise ValueError(f"id {name!r} must be unique and a plain file name")
    # Checked here, not when its image is saved after every image is generated (fsencode
    # raises for a lone surrogate, which no file name can hold).
    if "\0" in name or len(os.fsencode(f"{name}.png")) > NAME_MAX:
        raise ValueError(f"id {name[:40]!r} names no image file (images/<id>.png: no NUL, at "
                         f"most {NAME_MAX} bytes)")
    check_spec(item["spec"])
    if item["category"] != item["spec"]["category"]:  # scored under the item's, judged by the spec's
        raise ValueError(f"category {item['category']!r} is not its spec's "
                         f"({item['spec']['category']!r})")


def _eval(args: argparse.Namespace) -> int:
    from bdt import output_dirs
    from bdt.commands.model import check_new_output
    from bdt.commands.sample import load_for_args
    from bdt.eval.run import evaluate, markdown_table, select
    from bdt.eval.suite import load_suite
    from bdt.generation.sampling import PromptError

    if args.per_category < 0:
        raise ValueError(f"--per-category must be >= 0, got {args.per_category}")
    suite = _read_suite(args.suite) if args.suite else load_suite()
    items = select(suite, args.categories, args.per_category)
    # An earlier report's images would mix with this one's: a new or empty --out (or
    # --overwrite), checked before the model loads; the report appears whole (staged).
    check_new_output(args)
    trained, (width, height), sampling = load_for_args(args)
    with output_dirs.staged_dir(args.out, overwrite=args.overwrite, last="eval.json") as tmp:
        try:
            result = evaluate(trained, None, items, width, height, sampling, batch=args.batch,
                              out_dir=tmp, progress=True, any_bucket=args.any_bucket)
        except PromptError as e:  # its place among the selected items means nothing to a user
            raise ValueError(f"suite item {items[e.index]['id']!r}: {e.reason}") from None
    print(markdown_table(result), end="")
    print(f"wrote eval.json, eval.md, grid.png and {len(items)} images to {args.out}")
    return 0
