"""One markdown table of every benchmark's goals: bench/results/README.md (`make bench`, last).

Each bdt benchmark writes `goals` ([{goal, value, target, met, limit}]) into its JSON; the
extraction benchmark (bench/extract_throughput.py) writes its own layout, read here as it is.
"""

from __future__ import annotations

import json
import os

from common import RESULTS, machine

ORDER = ["decode_speed", "train_throughput", "data_path", "extract_throughput", "zero_memory",
         "resume_cost"]


def extraction_goals(d: dict) -> list[dict]:
    """bench/extract_throughput.py's rows: pipeline / bare images/s per input size."""
    rows = d.get("rows", [])
    if not rows:
        return []
    ratios = ", ".join(f"{r['input_images']} img: {r['ratio']:.2f}" for r in rows)
    last = rows[-1]["ratio"]
    out = [{"goal": "6. extraction pipeline / bare encode loop", "value": ratios,
            "target": ">= 0.85 (overhead <= 15%)", "met": last >= 0.85,
            "limit": "Ray start-up and planning at small inputs"}]
    workers = d.get("workers")
    if isinstance(workers, dict) and workers:
        out.append({"goal": "6. extraction 1 vs 2 workers", "value": json.dumps(workers),
                    "target": "", "met": None, "limit": ""})
    return out


def load_all() -> list[tuple[str, dict]]:
    found = []
    for name in ORDER:
        path = os.path.join(RESULTS, f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                found.append((name, json.load(f)))
    return found


def main() -> None:
    lines = ["| goal | measured | target | met | what limits it | run (UTC), load before/after |",
             "|---|---|---|---|---|---|"]
    for name, d in load_all():
        goals = d.get("goals") or (extraction_goals(d) if name == "extract_throughput" else [])
        when = d.get("date", "")
        load = d.get("load_before"), d.get("load_after")
        stamp = f"{when}, {load[0][0]:.1f}/{load[1][0]:.1f}" if all(load) else when
        for g in goals:
            met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
            lines.append(f"| {g['goal']} | {g['value']} | {g['target']} | {met} | "
                         f"{g['limit'] or ''} | {stamp or name} |")
    m = machine()
    isa = ", ".join(k for k, v in m["flags"].items() if v) or "none of amx/avx512"
    text = (f"# Benchmark results\n\nMachine: {m['cpu']}, {m['cpus']} cores ({isa}), shared with "
            f"other jobs (load = 1-minute load average). Regenerate with `make bench`; each "
            f"script's table and JSON are in this directory.\n\n" + "\n".join(lines) + "\n")
    path = os.path.join(RESULTS, "README.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    print(text)


if __name__ == "__main__":
    main()
