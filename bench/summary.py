"""One markdown table of every benchmark's goals: bench/results/README.md (`make bench`, last).

Each bdt benchmark writes `goals` ([{goal, value, target, met, limit}]) into its JSON; the
extraction benchmark (bench/extract_throughput.py) writes its own layout, read here as it is.
The same table replaces the part of docs/results.md between the two BENCH_MARKERS, so the
results page always quotes the latest run (with its date and machine); not when the results are
elsewhere ($BDT_BENCH_RESULTS: a read-only checkout's, a test's), which are not the checkout's.
"""

from __future__ import annotations

import argparse
import json
import os

from common import REPO, RESULTS, machine, write_atomic

BENCH_MARKERS = ("<!-- bench:begin (bench/summary.py writes this part) -->", "<!-- bench:end -->")

ORDER = ["tokenizer_quality", "decode_speed", "train_throughput", "data_path", "data_prefetch",
         "extract_throughput", "zero_memory", "resume_cost", "checkpoint_hash", "gpu_throughput",
         "gpu_check"]


def extraction_goals(d: dict) -> list[dict]:
    """bench/extract_throughput.py's rows: pipeline / bare images/s per input size."""
    rows = [r for r in d.get("rows", []) if "ratio" in r]  # other rows: other measurements
    if not rows:
        return []
    ratios = ", ".join(f"{r['input_images']} img: {r['ratio']:.2f}" for r in rows)
    last = rows[-1]["ratio"]
    out = [{"goal": "6. extraction pipeline / bare encode loop", "value": ratios,
            "target": ">= 0.85 (overhead <= 15%)", "met": last >= 0.85,
            "limit": "Ray start-up and planning at small inputs"}]
    mem = [(r["input_images"], r["pipeline"]["peak_rss_mb"]["one_actor"]) for r in d["rows"]
           if "pipeline" in r]
    if len(mem) >= 3:
        # Flat = no growth once warm: the slope from the middle size to the largest.
        (n0, m0), (n1, m1) = mem[len(mem) // 2], mem[-1]
        slope = (m1 - m0) / max((n1 - n0) / 1000, 1e-9)
        out.append({"goal": "6. extraction: one actor's peak RSS as the input grows",
                    "value": ", ".join(f"{n} img: {m:.0f} MB" for n, m in mem)
                    + f" ({slope:+.1f} MB per 1000 images from {n0} on)",
                    "target": "flat (<= 2 MB per 1000 images)", "met": slope <= 2.0,
                    "limit": "" if slope <= 2.0 else "actor memory grows with the input"})
    workers = d.get("workers")
    if isinstance(workers, dict) and workers:
        out.append({"goal": "6. extraction 1 vs 2 workers", "value": json.dumps(workers),
                    "target": "", "met": None, "limit": ""})
    return out


GOAL_KEYS = ("goal", "value", "target", "met", "limit")


def load_all() -> list[tuple[str, dict]]:
    """The results present, in ORDER; a file that is not a benchmark's result (torn, another
    shape) is named and left out: one bad file must not hide every other row."""
    found = []
    for name in ORDER:
        path = os.path.join(RESULTS, f"{name}.json")
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                d = json.load(f)
            problem = _shape_problem(d)
        except (OSError, ValueError) as e:
            problem = f"not JSON ({e})"
        if problem:
            print(f"{path}: left out of the table: {problem}")
            continue
        found.append((name, d))
    return found


def _shape_problem(d) -> str:
    if not isinstance(d, dict):
        return f"holds a {type(d).__name__}, not a result object"
    goals = d.get("goals", [])
    if not isinstance(goals, list) or not all(
            isinstance(g, dict) and all(k in g for k in GOAL_KEYS) for g in goals):
        return f"'goals' is not a list of {{{', '.join(GOAL_KEYS)}}}"
    return ""


def main() -> None:
    lines = ["| goal | measured | target | met | what limits it | run (UTC), load before/after |",
             "|---|---|---|---|---|---|"]
    machines: list[str] = []  # distinct machine descriptions, in row order
    rows = []
    for name, d in load_all():
        goals = d.get("goals") or (extraction_goals(d) if name == "extract_throughput" else [])
        when = d.get("date", "")
        load = d.get("load_before"), d.get("load_after")
        stamp = f"{when}, {load[0][0]:.1f}/{load[1][0]:.1f}" if all(load) else when
        where = describe(d["machine"]) if "flags" in d.get("machine", {}) else None
        if where is not None and where not in machines:
            machines.append(where)
        rows += [(g, stamp or name, where) for g in goals]
    for g, stamp, where in rows:  # runs of one session can land on machines of different ISAs
        mark = f" (machine {machines.index(where) + 1})" if len(machines) > 1 and where else ""
        met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['value']} | {g['target']} | {met} | "
                     f"{g['limit'] or ''} | {stamp}{mark} |")
    if len(machines) > 1:
        where = "Machines: " + "; ".join(f"machine {i + 1}: {m}" for i, m in enumerate(machines))
    else:
        where = "Machine: " + (machines[0] if machines else describe(machine()))
    text = (f"# Benchmark results\n\n{where}; shared with other jobs (load = 1-minute "
            f"load average). Regenerate with `make bench`; each script's table and JSON are in "
            f"`bench/results/`.\n\n" + "\n".join(lines) + "\n")
    write_atomic(os.path.join(RESULTS, "README.md"), text)
    if os.path.abspath(RESULTS) == os.path.join(REPO, "bench", "results"):
        quote_in_results_doc(text.split("\n", 2)[2])  # without the heading
    else:
        print(f"docs/results.md left as it is: these results are in {RESULTS}")
    print(text)


def describe(m: dict) -> str:
    isa = ", ".join(k for k, v in m["flags"].items() if v) or "none of amx/avx512"
    cpu = f"{m['cpu']}, {m['cpus']} cores ({isa})"
    return f"{m['gpu']} (torch {m.get('torch', '?')}) with {cpu}" if m.get("gpu") else cpu


def quote_in_results_doc(text: str) -> None:
    path = os.path.join(REPO, "docs", "results.md")
    doc = open(path).read()
    begin, end = BENCH_MARKERS
    if begin not in doc or end not in doc:
        print(f"docs/results.md has no {begin} ... {end} part: not quoted there")
        return
    head, rest = doc.split(begin, 1)
    write_atomic(path, head + begin + "\n" + text.strip() + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    main()
