"""Helpers every benchmark shares: environment facts for the JSON, the table printer, the atomic
result writer, the two model sizes the benchmarks use and the flags that change them.

The machine is shared: every result records the load average before and after the run, and the
compared variants of a benchmark always run interleaved in one process, so the ratios (not the
absolute times) are what a reader should trust.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# BDT_BENCH_RESULTS: elsewhere (scripts/gpu_check.sh, where the checkout is read-only).
RESULTS = os.environ.get("BDT_BENCH_RESULTS") or os.path.join(REPO, "bench", "results")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Caption styles of the shapes data: the text side of every benchmark sample.
CAPTIONS = ["a red circle", "two blue squares", "a green star left of a yellow cross",
            "three purple triangles", "a pink square above an orange circle"]

# The ~100M-parameter training configuration (issue 8 items 3, 4, 7): a Qwen3 of hidden 768,
# 12 layers, 12 heads (4 KV), SwiGLU 2048 (vocabulary ~1k) + a 3-block head of width 384:
# 83M parameters in all; P = 4.
LLM_100M = dict(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048)
HEAD_100M = {"width": 384, "depth": 3, "num_adaln_sets": 1, "head_dim": 64, "bits": 16}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> dict[str, bool]:
    """The ISA extensions that decide the training dtype (bf16 only pays with AMX)."""
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        flags = []
    return {k: k in flags for k in ("amx_bf16", "avx512_bf16", "avx512f", "avx2")}


def machine() -> dict:
    """This machine; with its GPU (name, count, torch/CUDA versions) when torch sees one."""
    import torch

    out = {"cpu": cpu_model(), "cpus": os.cpu_count(), "flags": cpu_flags(),
           "python": platform.python_version()}
    if torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                   torch=torch.__version__, cuda=torch.version.cuda)
    return out


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Run:
    """One benchmark invocation: `with Run("name") as run: ...; run.write(results)`."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> Run:
        self.t0 = time.time()
        self.load_before = load()
        return self

    def __exit__(self, *exc) -> None:
        pass

    def stamp(self) -> dict:
        """What bench/summary.py reads beside the goals: the bench, when, where, the load."""
        return {"bench": self.name,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "wall_s": round(time.time() - self.t0, 1), "machine": machine(),
                "load_before": self.load_before, "load_after": load()}

    def write(self, results: dict, goals: list[dict]) -> str:
        """results: anything JSON; goals: [{goal, value, target, met, limit}] for the summary."""
        return write_json(os.path.join(RESULTS, f"{self.name}.json"),
                          {**self.stamp(), "goals": goals, "results": results})


def write_atomic(path: str, text: str) -> None:
    """A killed run leaves the old file or none, never a torn one; the folder is made if new."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json(path: str, obj) -> str:
    """obj as strict JSON at path (atomically). NaN and infinities are not JSON (json.dump
    writes them anyway, and strict readers stop there): each becomes null, named on stdout."""
    write_atomic(path, json.dumps(_finite(obj, path, ""), indent=1, allow_nan=False) + "\n")
    return path


def _finite(v, path: str, key: str):
    if isinstance(v, float) and not math.isfinite(v):
        print(f"{path}: {key or 'the value'} is {v}, written as null")
        return None
    if isinstance(v, dict):
        return {k: _finite(x, path, f"{key}.{k}" if key else str(k)) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x, path, f"{key}[{i}]") for i, x in enumerate(v)]
    return v


def add_model_args(ap, llm: dict, head: dict) -> None:
    """The model-size flags (--hidden ... --head-depth), defaulting to `llm` and `head` (dicts
    shaped as LLM_100M and HEAD_100M): the same names in every script that builds a model."""
    for key in ("hidden", "layers", "heads", "kv_heads", "intermediate"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=llm[key])
    ap.add_argument("--head-width", type=int, default=head["width"])
    ap.add_argument("--head-depth", type=int, default=head["depth"])


def model_args(args) -> tuple[dict, dict]:
    """(llm, head) of the flags add_model_args made, in LLM_100M's and HEAD_100M's shape."""
    llm = {k: getattr(args, k) for k in LLM_100M}
    return llm, dict(HEAD_100M, width=args.head_width, depth=args.head_depth)


def goal(name: str, value: str, target: str, met: bool | None, limit: str = "") -> dict:
    return {"goal": name, "value": value, "target": target, "met": met, "limit": limit}


def table(headers: Sequence[str], rows: Sequence[Sequence], title: str = "") -> str:
    """A plain-text table (right-aligned numbers), printed and returned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = ([title] if title else []) + ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _cell(v) -> str:
    if v is None:  # an undefined value (JSON null)
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def bench_env() -> dict:
    """Environment for child processes (trainer runs): CPU DeepSpeed, no hub, quiet tokenizers."""
    return dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0",
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def write_token_shard(path: str, samples, stage: str = "bench") -> None:
    """One token shard (the extraction format) of (bits_hwB uint8 [h, w, C/8], (W, H) px,
    caption) triples, keyed s000000, s000001, ..."""
    from bdt.data.shard_writer import ShardWriter
    from bdt.data.token_shards import TokenSample, encode_sample

    with ShardWriter(path) as sink:
        for i, (bits_hwB, bucket, caption) in enumerate(samples):
            sink.write(encode_sample(TokenSample(
                key=f"s{i:06d}", bits_hwB=bits_hwB, bits_per_token=8 * bits_hwB.shape[-1],
                bucket=bucket, caption=caption, source_key=str(i), source_shard="bench",
                stage=stage)))
