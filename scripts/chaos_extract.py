"""Kill bdt jobs at random moments, rerun them, and check the result equals an uninterrupted run.

    .venv/bin/python scripts/chaos_extract.py extract   [--kills 12] [--seed 0] [--work DIR]
    .venv/bin/python scripts/chaos_extract.py tokenizer [--kills 12] [--seed 0] [--work DIR]

`extract`: builds a small raw dataset (shapes tars plus a tar of bad samples and a truncated
one) and a random tiny tokenizer, runs `python pipelines/extract_tokens.py` (a private local Ray)
once uninterrupted as the reference. Then, round after round, into a fresh output, it starts the
same command again and again, SIGKILLing each try at a seeded random moment (half of the kills:
once the try has written its k-th file, k random, so that they land inside the work rather than
in Ray's start), until a try ends by itself; each round's output must equal the reference: every shard, marker and rejects file byte
for byte, index.json and config.yaml but for the output path and the run's timings, and no other
file (a temp file left over). Rounds go on until `--kills` tries were killed.

`tokenizer`: the same with `python tokenizers/train.py` (one plain process, or `--ranks N` CPU
ranks under torchrun with ZeRO-2; a data worker, the discriminator on, a checkpoint every few
steps); about half of the kills land while a checkpoint
is being written (the first save after a random moment: a `step_*` folder of this try without
its COMPLETE marker). The export, the
last checkpoint's EMA and discriminator and the last logged value of every logged quantity per
step (timings aside) must equal the reference run's bit for bit (tokenizers/README.md: "The
resumed run repeats the uninterrupted one exactly"), and the run folder must hold the same
file names (no temp file or checkpoint left over).

`--kill session` (default) SIGKILLs everything the driver started, at once, as a lost node dies:
its session (the driver runs in one of its own: Ray's GCS, raylet and workers, data workers) and
every descendant seen in another (torchrun's ranks, bdt's Ray reaper), and nothing else.
`--kill driver` SIGKILLs the driver (or launcher) alone and checks that what it started goes
away by itself (bdt's Ray reaper, the ranks' launcher watch, the data workers' parent check). Either way a try's processes still running
`--orphan-wait-s` later are killed by this script and reported. Prints a table of kills and the
verdict; exit 1 on a mismatch, an orphan or a run that failed, 0 when every round matches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import time

from chaos_kills import REPO, chaos, compare_dirs, diff_json, file_digests

sys.path.insert(0, REPO)


# ---- extraction ------------------------------------------------------------------------------

def _build_raw(raw: str, tokenizer: str, images: int) -> None:
    """Shapes tars, a tar of bad samples (each rejected with its reason), a truncated tar."""
    import io

    import numpy as np
    import torch
    import webdataset as wds
    from PIL import Image

    from bdt.data.shapes import ShapesConfig
    from bdt.data.shards import generate
    from bdt.tokenizer import BinaryAutoencoder, TokenizerConfig, save_tokenizer

    generate(ShapesConfig(out=raw, num=images, sizes=["48", "64x32"], per_shard=8, format="png"))
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)).save(png, "PNG")
    png = png.getvalue()
    bad = [{"__key__": "corrupt", "png": b"\x89PNG not really", "txt": b"x"},
           {"__key__": "nocap", "png": png}, {"__key__": "empty", "png": png, "txt": b" "},
           {"__key__": "small", "png": png[:40], "txt": b"x"}, {"__key__": "ok", "png": png, "txt": b"fine"},
           {"__key__": "../evil", "png": png, "txt": b"x"}]
    for name, samples in (("bad-000000.tar", bad), ("cut-000000.tar", bad[-2:] + bad[:2])):
        with wds.TarWriter(os.path.join(raw, name), encoder=False) as w:
            for s in samples:
                w.write(s)
    cut = os.path.join(raw, "cut-000000.tar")
    os.truncate(cut, os.path.getsize(cut) * 2 // 3)
    torch.manual_seed(0)
    save_tokenizer(BinaryAutoencoder(TokenizerConfig(ch=32, ch_mult=[1, 1, 1], num_res_blocks=1,
                                                     z_channels=16)), tokenizer)


def _index_without_run_details(path: str) -> dict:
    with open(path) as f:
        index = json.load(f)
    index["config"].pop("output", None)
    for key in ("seconds", "new_samples_per_s", "skipped_units"):  # differ between any two runs
        index.get("summary", {}).pop(key, None)
    return index


def cmd_extract(ns: argparse.Namespace) -> int:
    raw, tok = os.path.join(ns.work, "raw"), os.path.join(ns.work, "tokenizer")
    if not os.path.exists(os.path.join(tok, "config.json")):
        _build_raw(raw, tok, ns.images)
    config = os.path.join(ns.work, "extract.yaml")
    with open(config, "w") as f:
        f.write(f"inputs: {raw}/*.tar\ntokenizer: {tok}\nstages:\n  - resolution: 32\n"
                f"  - resolution: 48\nmin_side: 16\nbatch_size: 4\nnum_actors: 2\n"
                f"progress_interval_s: 1\n")

    def command(out: str) -> list[str]:
        return [sys.executable, "pipelines/extract_tokens.py", "--config", config, f"output={out}"]

    def compare(ref: str, out: str) -> list[str]:
        def config_yaml(a: str, b: str) -> list[str]:
            with open(a) as fa, open(b) as fb:
                same = fa.read().replace(ref, "OUT") == fb.read().replace(out, "OUT")
            return [] if same else [": differs beyond the output path"]

        def index_json(a: str, b: str) -> list[str]:
            return diff_json(_index_without_run_details(a), _index_without_run_details(b))

        return compare_dirs(ref, out, {"config.yaml": config_yaml, "index.json": index_json})

    def state(out: str) -> str:
        names = [n for _, _, files in os.walk(out) for n in files]
        return (f"{sum(n.endswith('.done.json') for n in names)} markers, "
                f"{sum('.tmp' in n for n in names)} temp files, index.json "
                f"{'yes' if os.path.exists(os.path.join(out, 'index.json')) else 'no'}")

    def event(out: str, ref: str, rng: random.Random, moment: float):
        """Kill once this try has written its k-th file (temps count): inside the work."""
        k = rng.randint(1, len(file_digests(ref)))

        def written(start: float) -> bool:
            n = 0
            for dirpath, _, names in os.walk(out):
                for name in names:
                    with contextlib.suppress(FileNotFoundError):
                        n += os.stat(os.path.join(dirpath, name)).st_mtime >= start
            return n >= k

        return f"file {k}", written

    return chaos(ns, command, compare, state, event)


# ---- tokenizer trainer -----------------------------------------------------------------------

_NOT_COMPARED = ("time", "step_time_s", "data_wait_frac", "items_per_s_rank", "items_per_s")


def _last_per_step(run_dir: str) -> tuple[dict[str, dict], int]:
    """{step: its last logged record without timings}, and how many records repeated a step
    (none: a resume cuts what a killed try logged after its last checkpoint)."""
    out, repeats = {}, 0
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            repeats += str(rec["step"]) in out
            out[str(rec["step"])] = {k: v for k, v in rec.items() if k not in _NOT_COMPARED}
    return out, repeats


def _tensors_differ(a: dict, b: dict, what: str) -> list[str]:
    import torch

    if set(a) != set(b):
        return [f"{what}: other tensor names"]
    return [f"{what}[{k}]: values differ" for k in sorted(a) if not torch.equal(a[k], b[k])]


def _newest_shared(run_dir: str) -> dict:
    import torch

    from bdt.training.checkpoint import SHARED_FILE, list_checkpoints

    root = os.path.join(run_dir, "checkpoints")
    newest = [tag for _, tag, done in list_checkpoints(root) if done][-1]
    return torch.load(os.path.join(root, newest, SHARED_FILE), weights_only=True)


def cmd_tokenizer(ns: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    data = os.path.join(ns.work, "shapes")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        from bdt.data.shapes import ShapesConfig
        from bdt.data.shards import generate

        generate(ShapesConfig(out=data, num=48, sizes=["32"], per_shard=6, format="png"))
    overrides = ["model.ch=32", "model.ch_mult=[1,1]", "model.num_res_blocks=1", "model.z_channels=8",
                 "data.size=16", f"data.shards={data}/shapes-{{000000..000007}}.tar",
                 f"data.num_workers={ns.workers}", "deepspeed.micro_batch_size=2", "optim.lr=1e-3",
                 "optim.warmup_steps=2", "logging.every=1", "logging.image_every=0",
                 "logging.tensorboard=false", "loss.disc_weight=0.1", "loss.disc_start=3",
                 "loss.lecam_weight=0.05", "loss.disc_layers=1", "loss.disc_width=8",
                 f"steps={ns.steps}", f"checkpoint.every={ns.every}", "checkpoint.keep_last=2"]

    launcher = [sys.executable]
    if ns.ranks > 1:  # torchrun: ranks are children of the launcher, in its session
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ns.ranks}"]
        overrides.append("deepspeed.zero_stage=2")

    def command(run_dir: str) -> list[str]:
        return [*launcher, "tokenizers/train.py", f"run_dir={run_dir}", *overrides]

    def compare(ref: str, out: str) -> list[str]:
        (la, _), (lb, repeats) = _last_per_step(ref), _last_per_step(out)
        diffs = diff_json(la, lb, "metrics")
        if repeats:
            diffs.append(f"metrics.jsonl: {repeats} records repeat a step (not cut on resume)")
        # Contents that name the run (RUN_ID, owner.json, config.yaml) differ; the names may not.
        names_a, names_b = set(file_digests(ref)), set(file_digests(out))
        diffs += [f"{rel}: only in the reference" for rel in sorted(names_a - names_b)]
        diffs += [f"{rel}: only in the killed run's (left over?)" for rel in sorted(names_b - names_a)]
        diffs += _tensors_differ(load_file(os.path.join(ref, "export", "model.safetensors")),
                                 load_file(os.path.join(out, "export", "model.safetensors")), "export")
        a, b = _newest_shared(ref), _newest_shared(out)
        return (diffs + _tensors_differ(a["ema"]["shadow"], b["ema"]["shadow"], "ema")
                + _tensors_differ(a["disc"]["net"], b["disc"]["net"], "disc"))

    def tags(out: str) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(n for n in os.listdir(os.path.join(out, "checkpoints"))
                          if n.startswith("step_") and "." not in n)
        return []

    def complete(out: str, tag: str) -> bool:
        return os.path.exists(os.path.join(out, "checkpoints", tag, "COMPLETE"))

    def state(out: str) -> str:
        steps = [(t[5:].lstrip("0") or "0", complete(out, t)) for t in tags(out)]
        return (f"checkpoints complete {','.join(s for s, c in steps if c) or '-'}, "
                f"incomplete {','.join(s for s, c in steps if not c) or '-'}")

    def in_save(out: str, start: float) -> bool:  # a checkpoint folder of this try, no marker yet
        return any(not complete(out, t) and os.stat(os.path.join(out, "checkpoints", t)).st_mtime > start
                   for t in tags(out))

    def event(out: str, ref: str, rng: random.Random, moment: float):
        """Kill in the first checkpoint save after `moment`."""
        return "save", lambda start: time.time() - start >= moment and in_save(out, start)

    return chaos(ns, command, compare, state, event)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="job", required=True)
    for name in ("extract", "tokenizer"):
        p = sub.add_parser(name)
        p.add_argument("--kills", type=int, default=12, help="killed tries in all (12)")
        p.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
        p.add_argument("--work", default=f"/tmp/bdt-chaos-{name}", help="scratch folder (reused)")
        p.add_argument("--kill", choices=("session", "driver"), default="session",
                       help="what gets SIGKILL: everything the driver started, or the driver alone")
        p.add_argument("--orphan-wait-s", type=float, default=30.0,
                       help="a try's process still running this long after it ended is an orphan")
    sub.choices["extract"].add_argument("--images", type=int, default=200,
                                        help="shapes images (200; the data is made once per --work)")
    sub.choices["tokenizer"].add_argument("--steps", type=int, default=60)
    sub.choices["tokenizer"].add_argument("--every", type=int, default=3, help="checkpoint.every (3)")
    sub.choices["tokenizer"].add_argument("--workers", type=int, default=1, help="data.num_workers (1)")
    sub.choices["tokenizer"].add_argument("--ranks", type=int, default=1,
                                          help="> 1: that many CPU ranks under torchrun, ZeRO-2 (1)")
    ns = parser.parse_args()
    os.makedirs(ns.work, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # runs the cleanup
    return cmd_extract(ns) if ns.job == "extract" else cmd_tokenizer(ns)


if __name__ == "__main__":
    sys.exit(main())
