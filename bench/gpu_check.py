"""The Python side of scripts/gpu_check.sh: what the machine has, and the check's result file.

    python bench/gpu_check.py env --out OUT [--rehearsal]
        finds every package the check needs (installed metadata, no import but torch's: cold
        imports on a fresh machine could outlast the stage's 20 s; a package that is there but
        broken fails the stage that imports it, in its log) and says which are missing (exit 1
        if a needed one is, or if there is no CUDA device outside a rehearsal); writes
        OUT/env.json
    python bench/gpu_check.py backend --results FILE
        the 1.2B trainer run's attention backend: flex, unless the throughput stage's FILE
        (bench/results/gpu_throughput.json) has flex failed or hung, then its fastest one
    python bench/gpu_check.py report --out OUT --work WORK [--name gpu_check]
        reads the stage table (OUT/stages.tsv), the 1.2B trainer run's metrics, the extraction
        and evaluation outputs; writes bench/results/<name>.json (bench/summary.py's rows)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import statistics
import sys

import yaml

from common import Run, goal, write_json

NEEDED = ["torch", "transformers", "tokenizers", "safetensors", "sentencepiece", "webdataset",
          "braceexpand", "omegaconf", "yaml", "numpy", "PIL", "fsspec", "psutil", "tqdm",
          "pytest", "deepspeed", "pydantic", "hjson"]
OPTIONAL = {"triton": "flex on CUDA (torch.compile lowers flex_attention to Triton)",
            "torch.nn.attention.varlen": "the varlen backend (torch >= 2.10)",
            "flash_attn": "the flash backend",
            "ray": "not needed here: the extraction worker is called directly",
            "tensorboard": "not needed here (logging.tensorboard: false)"}


def _version(name: str, dists: dict[str, list[str]]) -> str | None:
    """The installed version of module `name` (its distribution's), "present" for a module of no
    distribution (a submodule, a folder on PYTHONPATH), None when it cannot be found. A folder
    without __init__.py is no package: the repo's tokenizers/ stood in for a missing one."""
    try:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:  # not there, or only a namespace of folders
            return None
    except (ImportError, ValueError):  # a parent package missing, or a broken one
        return None
    for dist in dists.get(name.split(".")[0], []) if "." not in name else []:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return "present"


def env(out: str, rehearsal: bool) -> int:
    found, missing = {}, {}
    dists = importlib.metadata.packages_distributions()
    for name in NEEDED + list(OPTIONAL):
        version = _version(name, dists)
        if version is None:
            missing[name] = "not found"
        else:
            found[name] = version
    import torch

    cuda = torch.cuda.is_available()
    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": cuda, "found": found,
            "missing": missing, "rehearsal": rehearsal}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}",
                    memory_gib=round(p.total_memory / 2 ** 30, 1),
                    device_count=torch.cuda.device_count())
    write_json(os.path.join(out, "env.json"), info)  # makes OUT: a run by hand need not
    print(f"python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), device: "
          f"{info.get('device', 'none')}")
    for name in NEEDED:
        print(f"  {'ok ' if name in found else 'MISSING'} {name} {found.get(name, missing.get(name))}")
    for name, why in OPTIONAL.items():
        state = found.get(name) or "absent"
        print(f"  opt {name} {state}: {why}")
    lacking = [n for n in NEEDED if n in missing]
    if lacking:
        print(f"gpu_check: missing packages: {', '.join(lacking)}. Install them (docs/"
              f"environment.md, 'A bare CUDA machine': wheels with --no-deps into a --target "
              f"directory on PYTHONPATH), then rerun.")
        return 1
    if not cuda and not rehearsal:
        print("gpu_check: no CUDA device visible to torch (a CPU-only torch build, or no "
              "driver); on a CPU machine run the rehearsal: scripts/gpu_check.sh --cpu-rehearsal")
        return 1
    return 0


def _metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_backend(results_file: str) -> str:
    """flex, unless the throughput stage saw flex fail or hang (a hang there would hang the
    trainer's flex for the whole stage): then the fastest backend measured there, else sdpa."""
    try:
        with open(results_file) as f:
            backends = json.load(f)["results"]["backends"]
    except (OSError, ValueError, KeyError) as e:
        print(f"gpu_check: {results_file}: no throughput results ({e}); training with flex",
              file=sys.stderr)
        return "flex"
    flex = backends.get("flex", {})
    if "failed" not in flex:
        return "flex"
    measured = [b for b, r in backends.items() if "mfu" in r and "+" not in b]
    chosen = max(measured, key=lambda b: backends[b]["tokens_per_s"], default="sdpa")
    print(f"gpu_check: flex {flex['failed']} in the throughput stage; the 1.2B trainer run "
          f"takes {chosen}", file=sys.stderr)
    return chosen


def trainer_run(run_dir: str) -> dict:
    """The logged windows of a trainer run: the first (compile, warm-up) apart from the rest."""
    windows = [m for m in _metrics(os.path.join(run_dir, "metrics.jsonl")) if "mfu" in m]
    out = {"logged_steps": [m["step"] for m in windows]}
    with contextlib.suppress(OSError):  # the resolved config the trainer wrote at its start
        with open(os.path.join(run_dir, "config.yaml")) as f:
            out["attn_backend"] = (yaml.safe_load(f).get("model") or {}).get("attn_backend")
    steady = windows[1:] or windows
    for key in ("mfu", "data_wait_frac", "tokens_per_s", "step_time_s", "loss"):
        values = [m[key] for m in steady if key in m]
        if values:
            out[key] = statistics.median(values)
    if windows:
        out["first_window_step_time_s"] = windows[0].get("step_time_s")
    return out


def report(out: str, work: str, name: str) -> None:
    stages = []
    with open(os.path.join(out, "stages.tsv")) as f:
        for line in f:
            stage, rc, seconds = line.split()
            stages.append({"stage": stage, "rc": int(rc), "seconds": int(seconds)})
    env_info = json.load(open(os.path.join(out, "env.json")))
    results = {"env": env_info, "stages": stages,
               "train_1b": trainer_run(os.path.join(work, "run_1b")),
               "train_shapes": trainer_run(os.path.join(work, "run_shapes"))}
    for key, path in (("extraction", os.path.join(work, "data", "data.json")),
                      ("eval", os.path.join(out, "eval", "eval.json"))):
        if os.path.isfile(path):
            results[key] = json.load(open(path))
    t = results["train_1b"]
    ok = {s["stage"]: s["rc"] == 0 for s in stages}
    stage_line = ", ".join(f"{s['stage']} {'ok' if s['rc'] == 0 else 'rc ' + str(s['rc'])} "
                           f"{s['seconds']} s" for s in stages)
    steps = t["logged_steps"]
    flex_trained = bool(steps) and t.get("attn_backend") == "flex"
    trained = (f"{len(steps)} log windows, steps {steps[0]}-{steps[-1]}" if steps
               else "no step logged") + (f" with {t.get('attn_backend')}, not flex"
                                         if steps and not flex_trained else "")
    goals = [goal("16.4 scripts/gpu_check.sh stages", stage_line, "all ok, <= 8 min in all",
                  all(ok.values()) and sum(s["seconds"] for s in stages) <= 480, ""),
             goal("16.1 flex trains in the trainer (1.2B)", trained, "steps", flex_trained, ""),
             goal("16.2 data_wait_frac (trainer, 1.2B)", f"{t.get('data_wait_frac', float('nan')):.3f}",
                  "<= 0.01", t.get("data_wait_frac", 1.0) <= 0.01, ""),
             goal("16.3 training MFU (trainer, 1.2B)", f"{t.get('mfu', float('nan')):.1%} of the "
                  "matmul peak measured at the run's start", ">= 40%", t.get("mfu", 0.0) >= 0.40,
                  "bench/results/gpu_throughput.json: profile")]
    if "extraction" in results:
        x = results["extraction"]
        goals.append(goal("16.4 extraction encoder on the device",
                          f"{x['images_per_s']:.0f} images/s ({x['device']}, {x['dtype']})", "",
                          None, "random-weight demo tokenizer; Ray not used"))
    if env_info.get("rehearsal"):
        for g in goals:  # a CPU rehearsal proves the plumbing, not the GPU goals
            g["met"], g["limit"] = None, "CPU rehearsal (tiny sizes, sdpa): not a GPU result"
    with Run(name) as run:
        run.write(results, goals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("--out", required=True)
    e.add_argument("--rehearsal", action="store_true")
    b = sub.add_parser("backend")
    b.add_argument("--results", required=True)
    r = sub.add_parser("report")
    r.add_argument("--out", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--name", default="gpu_check")
    args = ap.parse_args()
    if args.cmd == "env":
        sys.exit(env(args.out, args.rehearsal))
    if args.cmd == "backend":
        print(train_backend(args.results))
        return
    report(args.out, args.work, args.name)


if __name__ == "__main__":
    main()
