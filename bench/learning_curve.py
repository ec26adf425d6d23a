r"""Learning curve: shapes-suite scores against AR training FLOPs (issue 17 part 1).

Points come from two places:
- in-loop evaluations of a run (`eval.every` with `eval.per_category=0`: the whole suite), read
  from its metrics.jsonl with the FLOPs trained so far (`flops_seen`, logged on the same step);
- `bdt eval` reports of a run's export (one directory per sampling seed), placed at the run's
  final `flops_seen` and averaged over the seeds.

    python bench/learning_curve.py --series "demo recipe, 4x steps" RUN_DIR \
        --final "demo recipe (1x)" RUN_DIR EVAL_SEED0 EVAL_SEED1 ... \
        --unit-flops RUN_DIR --out docs/learning_curve
    python bench/learning_curve.py --add-to docs/learning_curve.json --final "GPU ..." RUN_DIR \
        EVAL_SEED0 EVAL_SEED1 --out docs/learning_curve    (new points beside the stored ones)

writes <out>.json (every point with its per-category and per-attribute accuracies) and
<out>.png (overall and single-object accuracy, and each attribute judged alone, against FLOPs
in units of the 1x demo run's). Prints the table.

`--ceiling RESULT` (a `bench/token_noise.py` result: the judge on the demo tokenizer's own
reconstructions of fresh images, no bits flipped) draws what that tokenizer's decoder allows at
the evaluation's size, the most an AR model drawing through it can score; kept by --add-to.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

CATEGORIES = ("single_object", "colors", "counting", "two_objects", "position", "color_attr")
ATTRIBUTES = ("count", "color", "shape", "position")


SUITE_PER_CATEGORY = 40  # the whole shapes suite: every point must be scored on all of it


def read_metrics(run_dir: str) -> list[dict]:
    """The records of RUN/metrics.jsonl; a torn last line (a run killed mid-write, or still
    writing) is left out, as the trainer's own reader does; a bad line elsewhere is an error."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path) as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (not a training run dir?)") from None
    records = []
    for k, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:  # RecursionError: garbage nested past the parser
            record = e
        if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
            if k < len(lines) - 1:
                raise ValueError(f"{path}:{n}: not a JSON record with an integer step "
                                 f"({str(record)[:80]})") from None
            continue
        records.append(record)
    return records


def _finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{where}: {value} (a NaN or inf score or FLOP count is no point)")
    return value


def final_flops(run_dir: str) -> float:
    flops = [r["flops_seen"] for r in read_metrics(run_dir) if "flops_seen" in r]
    if not flops:
        raise ValueError(f"{run_dir}/metrics.jsonl logs no flops_seen (a run from before it was "
                         f"logged?)")
    return _finite(flops[-1], f"{run_dir}/metrics.jsonl: the last flops_seen")


def _whole_suite_run(run_dir: str) -> None:
    """In-loop points count only from runs that evaluated the whole suite at every point."""
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        ev = (yaml.safe_load(f) or {}).get("eval") or {}
    if ev.get("per_category", 2) != 0 or ev.get("categories"):
        raise ValueError(f"{run_dir}/config.yaml: eval.per_category = {ev.get('per_category')}, "
                         f"eval.categories = {ev.get('categories')}: its in-loop evaluations "
                         f"score part of the suite (a curve needs per_category=0, all categories)")


def in_loop_points(run_dir: str) -> list[dict]:
    """One point per in-loop evaluation of the whole suite (per_category=0 runs)."""
    _whole_suite_run(run_dir)
    records = read_metrics(run_dir)
    flops_at = {r["step"]: r["flops_seen"] for r in records if "flops_seen" in r}
    points = []
    for r in records:
        if "eval_overall" not in r:
            continue
        if r["step"] not in flops_at:
            raise ValueError(f"{run_dir}: evaluation at step {r['step']} but no flops_seen logged "
                             f"there: make eval.every a multiple of logging.every")
        where = f"{run_dir}/metrics.jsonl, step {r['step']}"
        points.append({"step": r["step"], "flops": _finite(flops_at[r["step"]], where),
                       "seeds": 1, "source": "in-loop",
                       "overall": _finite(r["eval_overall"], where),
                       "per_category": {c: r[f"eval/{c}"] for c in CATEGORIES if f"eval/{c}" in r},
                       "per_attribute": {a: r[f"eval_attr/{a}"] for a in ATTRIBUTES
                                         if f"eval_attr/{a}" in r}})
    if not points:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no in-loop evaluation (eval.every)")
    return points


def final_point(run_dir: str, eval_dirs: list[str]) -> dict:
    """The run's end, scored by `bdt eval` once per sampling seed: the mean over seeds."""
    reports = [_whole_suite_report(d) for d in eval_dirs]
    seeds = [r["seed"] for r in reports]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{eval_dirs}: sampling seeds {seeds}: each eval dir must be another seed")
    settings = {(r["width"], r["height"], r["steps"], r["cfg_scale"]) for r in reports}
    if len(settings) > 1:
        raise ValueError(f"{eval_dirs}: sampled with different settings (width, height, steps, "
                         f"cfg_scale) {sorted(settings)}")

    def mean(key: str, names) -> dict:
        return {n: statistics.fmean(r[key][n] for r in reports) for n in names
                if all(n in r.get(key, {}) for r in reports)}

    step = max(r["step"] for r in read_metrics(run_dir) if "flops_seen" in r)
    return {"step": step, "flops": final_flops(run_dir), "seeds": len(reports), "source": "final",
            "overall": statistics.fmean(r["overall"] for r in reports),
            "overall_per_seed": [r["overall"] for r in reports],
            "per_category": mean("per_category", CATEGORIES),
            "per_attribute": mean("per_attribute", ATTRIBUTES)}


def _whole_suite_report(eval_dir: str) -> dict:
    path = os.path.join(eval_dir, "eval.json")
    with open(path) as f:
        report = json.load(f)
    counts = report.get("counts", {})
    if sorted(counts) != sorted(CATEGORIES) or set(counts.values()) != {SUITE_PER_CATEGORY}:
        raise ValueError(f"{path}: scores {counts}, not the whole suite ({SUITE_PER_CATEGORY} "
                         f"prompts in each of {len(CATEGORIES)} categories)")
    _finite(report["overall"], path)
    return report


def read_ceiling(path: str) -> dict:
    """The unflipped row of a bench/token_noise.py result: overall and per-category scores of
    the tokenizer's reconstructions, with the size, tokenizer, date and machine it was judged on."""
    with open(path) as f:
        stamped = json.load(f)
    try:
        result = stamped["results"]
        recon = result["reconstructions_by_flip_rate"]["0.0"]
        overall = _finite(float(recon["overall"]), f"{path}: overall")
        per_category = {c: _finite(float(v), f"{path}: {c}")
                        for c, v in recon["per_category"].items()}
        px = int(result["px"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a bench/token_noise.py result with an unflipped row "
                         f"({type(e).__name__}: {e})") from None
    return {"source": os.path.basename(path), "tokenizer": result.get("tokenizer"), "px": px,
            "num": result.get("num"), "date": stamped.get("date"),
            "machine": (stamped.get("machine") or {}).get("cpu"), "overall": overall,
            "per_category": per_category}


def plot(series: list[dict], unit: float, path: str, ceiling: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), sharex=True)
    colors = {}
    # tab10 repeats after ten series: six more colours that differ from its ten
    palette = list(plt.get_cmap("tab10").colors) + ["teal", "black", "darkgoldenrod", "navy",
                                                    "crimson", "olivedrab"]
    for i, s in enumerate(series):
        pts = sorted(s["points"], key=lambda p: p["flops"])
        x = [p["flops"] / unit for p in pts]
        marker, size = ("o", 7) if s["kind"] == "final" else (".", 6)
        colors[s["name"]] = color = palette[i % len(palette)]
        left.plot(x, [p["overall"] for p in pts], marker=marker, markersize=size, color=color)
        left.plot(x, [p["per_category"].get("single_object", float("nan")) for p in pts],
                  marker=marker, markersize=size, linestyle="--", color=color)
        for a, style in zip(ATTRIBUTES, ("-", "--", ":", "-.")):
            right.plot(x, [p["per_attribute"].get(a, float("nan")) for p in pts], marker=marker,
                       markersize=size, linestyle=style, color=color)
    for goal in (0.80, 0.50):
        left.axhline(goal, color="grey", linewidth=0.8, linestyle=":")
    bounds = []
    if ceiling:  # the tokenizer's reconstructions: as the curve's lines, overall solid
        for value, style in ((ceiling["overall"], "-"),
                             (ceiling["per_category"].get("single_object"), "--")):
            if value is not None:
                left.axhline(value, color="silver", linewidth=2.5, linestyle=style, zorder=0)
        bounds = [Line2D([], [], color="silver", linewidth=2.5)]
    # Powers of two on a log axis: "x the demo's compute" reads directly off the ticks.
    xs = [p["flops"] / unit for s in series for p in s["points"]]
    lo, hi = math.floor(math.log2(min(xs))), math.ceil(math.log2(max(xs)))
    for ax, title in ((left, "whole prompts (goals: single objects 0.80, overall 0.50)"),
                      (right, "each attribute judged alone")):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([2.0 ** e for e in range(lo, hi + 1)]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel("AR training FLOPs (x the 1x CPU demo recipe's)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    left.legend([Line2D([], [], color="k"), Line2D([], [], color="k", linestyle="--"), *bounds],
                ["overall", "single objects",
                 *([f"the tokenizer's reconstructions ({ceiling['px']} px)"] if bounds else [])],
                fontsize=8, loc="upper left")
    right.legend([Line2D([], [], color="k", linestyle=st) for st in ("-", "--", ":", "-.")],
                 list(ATTRIBUTES), fontsize=8, loc="upper left", ncol=2)
    fig.legend([Line2D([], [], color=c, marker="o") for c in colors.values()], list(colors),
               loc="lower center", ncol=min(3, len(colors)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(colors) / 3), 1, 1))
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--series", nargs=2, action="append", default=[], metavar=("NAME", "RUN_DIR"),
                   help="a run's in-loop evaluations")
    p.add_argument("--final", nargs="+", action="append", default=[],
                   metavar="NAME RUN_DIR EVAL_DIR", help="a run's end scored by bdt eval, one "
                   "EVAL_DIR per sampling seed")
    p.add_argument("--unit-flops", metavar="RUN_DIR",
                   help="the run whose final FLOPs are 1x (the CPU demo)")
    p.add_argument("--add-to", metavar="JSON", help="a curve written before: keep its unit and "
                   "series (a series given again by name is replaced), add the ones given here")
    p.add_argument("--ceiling", metavar="RESULT", help="a bench/token_noise.py result: the "
                   "judge on the tokenizer's own reconstructions, drawn as the curve's bound")
    p.add_argument("--out", default="docs/learning_curve")
    args = p.parse_args(argv)
    if (args.unit_flops is None) == (args.add_to is None):
        p.error("give exactly one of --unit-flops and --add-to")
    series = [{"name": name, "kind": "in-loop", "run_dir": run, "points": in_loop_points(run)}
              for name, run in args.series]
    finals: dict[str, dict] = {}
    for name, run, *evals in args.final:
        if not evals:
            raise ValueError(f"--final {name}: give the run dir and at least one eval dir")
        finals.setdefault(name, {"name": name, "kind": "final", "run_dir": run, "points": []})
        finals[name]["points"].append(final_point(run, evals))
    series += list(finals.values())
    ceiling = read_ceiling(args.ceiling) if args.ceiling else None
    if args.add_to:
        with open(args.add_to) as f:
            prior = json.load(f)
        unit = prior["unit_flops"]
        ceiling = ceiling or prior.get("ceiling")
        series = [s for s in prior["series"] if s["name"] not in {n["name"] for n in series}] + series
    else:
        unit = final_flops(args.unit_flops)
    # Both files appear together, only once both are made (an --add-to run replaces its input).
    plot(series, unit, args.out + ".tmp.png", ceiling)
    with open(args.out + ".json.tmp", "w") as f:
        json.dump({"unit_flops": unit, "series": series,
                   **({"ceiling": ceiling} if ceiling else {})}, f, indent=1, allow_nan=False)
    os.replace(args.out + ".tmp.png", args.out + ".png")
    os.replace(args.out + ".json.tmp", args.out + ".json")
    print(f"| series | step | FLOPs (x demo) | seeds | overall | single | "
          f"{' | '.join(ATTRIBUTES)} |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(ATTRIBUTES))
    for s in series:
        for pt in sorted(s["points"], key=lambda q: q["flops"]):
            attrs = " | ".join(f"{pt['per_attribute'].get(a, float('nan')):.3f}" for a in ATTRIBUTES)
            print(f"| {s['name']} | {pt['step']} | {pt['flops'] / unit:.2f} | {pt['seeds']} | "
                  f"{pt['overall']:.3f} | {pt['per_category'].get('single_object', float('nan')):.3f}"
                  f" | {attrs} |")
    if ceiling:
        print(f"| the tokenizer's reconstructions ({ceiling['px']} px; the bound) | - | - | - | "
              f"{ceiling['overall']:.3f} | "
              f"{ceiling['per_category'].get('single_object', float('nan')):.3f} |")
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
