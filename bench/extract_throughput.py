"""Pre-extraction throughput and memory: the Ray pipeline vs a bare single-process encode loop.

    nice -n 10 .venv/bin/python bench/extract_throughput.py [--sizes 250 750 3000 6000 12000] [--bare-max 750]

Data: the embedded shapes dataset (`bdt data shapes`, 128 px at three aspect ratios). Tokenizer:
configs/tokenizer/shapes_small.yaml, randomly initialised (speed does not depend on the weights).
Throughput: both sides use the same cores, the same reader and preprocessing (bdt.extract.input_reading,
bdt.data.images) and the same batch size; the bare loop (in its own process, run just before the
pipeline on the same data) skips Ray, writing and accounting. It runs for sizes <= --bare-max.
  ratio = pipeline images/s / bare images/s (goal >= 0.85: pipeline overhead <= 15%)
Pipeline time is the wall time of `run()` on a started Ray, so it includes actor start-up,
planning, writing, markers and the manifest.
Memory (streaming, not materialising the dataset, means these stay flat as the input grows):
RSS sampled every 0.1 s: peak of one tokenizer actor, of all actors together, of the driver
(this process: planning, accounting, the manifest) and of every process this script started
(driver, raylet, GCS, idle Ray workers); also each actor's last RSS before the run ended
(what it keeps between shards). Each is fitted against the input size by least squares and
reported as MB per 1000 input images. Writes bench/results/extract_throughput.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import psutil
import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bdt.config import load  # noqa: E402
from bdt.data.buckets import make_buckets  # noqa: E402
from bdt.data.images import ImageRejected, load_for_buckets, to_unit_range  # noqa: E402
from bdt.extract import input_reading, input_units  # noqa: E402
from bdt.extract.config import ExtractConfig  # noqa: E402
from bdt.tokenizer import BinaryAutoencoder, TokenizerConfig, pack_bits, save_tokenizer  # noqa: E402
from common import RESULTS, Run, write_json  # noqa: E402

RESOLUTION = 128
BATCH = 32
PER_SHARD = 50


def make_tokenizer(path: str) -> None:
    with open(os.path.join(REPO, "configs", "tokenizer", "shapes_small.yaml")) as f:
        model_cfg = yaml.safe_load(f)["model"]
    torch.manual_seed(0)
    save_tokenizer(BinaryAutoencoder(TokenizerConfig.from_dict(model_cfg)), path)


def make_data(out: str, num: int) -> str:
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "bdt"), "data", "shapes", "--out", out,
                    "--num", str(num), "--per-shard", str(PER_SHARD), "--size", "128", "64x128", "128x64",
                    "--seed", "0"], check=True, capture_output=True)
    return os.path.join(out, "shapes-*.tar")


def bare_loop(pattern: str, tokenizer: str, threads: int) -> dict:
    """Read, decode, bucket, encode and pack in one process: the work without the pipeline."""
    from bdt.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    model = load_tokenizer(tokenizer)
    buckets = make_buckets(RESOLUTION, model.downsample_factor)
    exts = ["jpg", "jpeg", "png", "webp"]
    t0 = time.time()
    n = 0
    pending: dict[tuple[int, int], list[np.ndarray]] = {}

    def flush(bucket):
        nonlocal n
        x = torch.from_numpy(to_unit_range(np.stack(pending.pop(bucket))))
        with torch.inference_mode():
            pack_bits(model.encode(x).numpy())
        n += x.shape[0]

    for unit in input_units.list_units(pattern, "tar", 1000, exts):
        for item in input_reading.iter_unit(unit, exts, 1 << 26, max_caption_bytes=1 << 16):
            if isinstance(item, input_reading.Reject) or \
                    input_reading.check_caption(item.caption, 1 << 16)[0] is None:
                continue
            try:
                (bucket, pixels, _), = load_for_buckets(item.image, [buckets], max_pixels=1 << 26, min_side=32)
            except ImageRejected:
                continue
            pending.setdefault(bucket, []).append(pixels)
            if len(pending[bucket]) >= BATCH:
                flush(bucket)
    for bucket in sorted(pending):
        flush(bucket)
    seconds = time.time() - t0
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2)}


class PeakRSS:
    """Peak RSS of this process's tree while a pipeline runs, sampled (see the module doc)."""

    def __init__(self, interval: float = 0.1):
        self.interval, self._stop = interval, threading.Event()
        self.actor_max = self.actors_sum = self.driver = self.tree = 0
        self.actor_last: dict[int, int] = {}  # pid -> latest RSS
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        me = psutil.Process()
        while not self._stop.is_set():
            actors, tree = {}, 0
            for p in [me] + me.children(recursive=True):
                try:
                    rss = p.memory_info().rss
                    if "ShardEncoder" in " ".join(p.cmdline()):
                        actors[p.pid] = rss
                    tree += rss
                except psutil.Error:
                    pass
            self.actor_last.update(actors)
            self.actor_max = max(self.actor_max, max(actors.values(), default=0))
            self.actors_sum = max(self.actors_sum, sum(actors.values()))
            self.driver = max(self.driver, me.memory_info().rss)
            self.tree = max(self.tree, tree)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def pipeline(pattern: str, tokenizer: str, out: str, cpus: int) -> dict:
    from bdt.extract.run import run

    cfg = load(ExtractConfig, [], [f"inputs={pattern}", f"output={out}", f"tokenizer={tokenizer}",
                                   f"stages=[{{resolution: {RESOLUTION}}}]", f"batch_size={BATCH}",
                                   f"num_actors={cpus}", "cpus_per_actor=1", "progress_interval_s=30"])
    with PeakRSS() as mem:
        t0 = time.time()
        summary = run(cfg)
        seconds = time.time() - t0
    n = summary["stages"][str(RESOLUTION)]["samples"]
    mb = 2**20
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2),
            "peak_rss_mb": {"one_actor": round(mem.actor_max / mb, 1), "all_actors": round(mem.actors_sum / mb, 1),
                            "driver": round(mem.driver / mb, 1), "all_processes": round(mem.tree / mb, 1)},
            "actor_last_rss_mb": round(max(mem.actor_last.values(), default=0) / mb, 1)}


def slope_per_1000(xs: list[int], ys: list[float]) -> float | None:
    """Least-squares slope of ys against xs, in y units per 1000 x; None (JSON null) with fewer
    than two sizes, where no line is defined."""
    if len(set(xs)) < 2:
        return None
    return round(float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0]) * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 750, 3000, 6000, 12000])
    parser.add_argument("--bare-max", type=int, default=750, help="run the bare loop for sizes up to this")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    import ray

    rows = []
    with Run("extract_throughput") as run, tempfile.TemporaryDirectory() as tmp:
        tok = os.path.join(tmp, "tokenizer")
        make_tokenizer(tok)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
                 object_store_memory=200 * 1024**2)
        try:
            for num in args.sizes:
                pattern = make_data(os.path.join(tmp, f"raw{num}"), num)
                row = {"input_images": num}
                if num <= args.bare_max:  # own process: its memory never shows in the driver's
                    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                        row["bare"] = pool.submit(bare_loop, pattern, tok, args.cpus).result()
                row["pipeline"] = pipeline(pattern, tok, os.path.join(tmp, f"out{num}"), args.cpus)
                if "bare" in row:
                    row["ratio"] = round(row["pipeline"]["images_per_s"] / row["bare"]["images_per_s"], 3)
                rows.append(row)
        finally:
            ray.shutdown()
    print(f"{'images':>7} {'bare img/s':>11} {'pipeline img/s':>15} {'ratio':>6} {'actor MB':>9} "
          f"{'actors MB':>10} {'driver MB':>10} {'all MB':>8} {'actor end MB':>13}")
    for r in rows:
        mem = r["pipeline"]["peak_rss_mb"]
        print(f"{r['input_images']:>7} {r.get('bare', {}).get('images_per_s', '-'):>11} "
              f"{r['pipeline']['images_per_s']:>15} {r.get('ratio', '-'):>6} {mem['one_actor']:>9} "
              f"{mem['all_actors']:>10} {mem['driver']:>10} {mem['all_processes']:>8} "
              f"{r['pipeline']['actor_last_rss_mb']:>13}")
    sizes = [r["input_images"] for r in rows]
    slopes = {key: slope_per_1000(sizes, [r["pipeline"]["peak_rss_mb"][key] for r in rows])
              for key in ("one_actor", "all_actors", "driver", "all_processes")}
    slopes["actor_last"] = slope_per_1000(sizes, [r["pipeline"]["actor_last_rss_mb"] for r in rows])
    print("MB per 1000 input images (least-squares slope): "
          + ", ".join(f"{k} {'-' if v is None else f'{v:+.1f}'}" for k, v in slopes.items()))
    # Its own layout (bench/summary.py's extraction_goals reads the rows), under the stamp every
    # result carries: the summary's row names its date, machine and load.
    write_json(os.path.join(RESULTS, "extract_throughput.json"),
               {**run.stamp(), "resolution": RESOLUTION, "batch_size": BATCH,
                "images_per_input_shard": PER_SHARD, "cpus": args.cpus,
                "tokenizer": "configs/tokenizer/shapes_small.yaml (random init)",
                "platform": platform.platform(), "rows": rows,
                "rss_slope_mb_per_1000_images": slopes})


if __name__ == "__main__":
    main()
