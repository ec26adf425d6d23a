"""Helpers for the training tests: token shards written with the real writer, tiny model files,
the spawned ranks' entry (rank_entry)."""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import os
import sys

import numpy as np
import webdataset as wds

from bdt.data.token_shards import TokenSample, encode_sample
from testkit import save_tiny_image_tokenizer

CAPTIONS = ["a red circle", "two blue squares", "a green star left of a yellow cross",
            "three purple triangles", "a pink square above an orange circle", "one cyan star"]


def write_shards(out_dir: str, grids: list[tuple[int, int]], num_shards: int, per_shard: int,
                 bits: int = 16, seed: int = 0, stage: str = "s",
                 captions: list[str] = CAPTIONS, factor: int = 16) -> list[str]:
    """Token shards of random bits; sample n = k * per_shard + i (shard k) has grid
    grids[n % len(grids)] and caption captions[n % len(captions)]. Buckets are grid x `factor`
    px (the image tokenizer's downsample factor: 2 for tiny_image_tokenizer, which in-loop
    evaluation decodes with, checked at start)."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    urls = []
    for k in range(num_shards):
        url = os.path.join(out_dir, f"{k:06d}.tar")
        with wds.TarWriter(url, encoder=False) as sink:
            for i in range(per_shard):
                n = k * per_shard + i
                h, w = grids[n % len(grids)]
                packed = rng.integers(0, 256, size=(h, w, bits // 8), dtype=np.uint8)
                sink.write(encode_sample(TokenSample(
                    key=f"s{n:06d}", bits_hwB=packed, bits_per_token=bits, bucket=(w * factor, h * factor),
                    caption=captions[n % len(captions)], source_key=f"src{n}", source_shard="raw.tar",
                    stage=stage)))
        urls.append(url)
    return urls


def tiny_llm(out_dir: str) -> str:
    from bdt.model.backbone import make_tiny_llm

    return make_tiny_llm(out_dir, CAPTIONS * 20, hidden=32, layers=2, heads=2, kv_heads=1,
                         intermediate=64, vocab_size=384, max_position_embeddings=1024)


def train_overrides(run_dir: str, llm: str, shards: str | list[str], steps: int | list[int] = 6,
                    zero: int = 2, precision: str = "fp32", every: int = 2, extra=()) -> list[str]:
    """key=value overrides of a tiny 2-stage (or 1-stage) run; the YAML is configs/train/tiny.yaml."""
    shards = [shards] if isinstance(shards, str) else shards
    steps = [steps] * len(shards) if isinstance(steps, int) else steps
    # A given peak skips the half-second matmul each rank times at start for MFU (the suite
    # starts ~100 runs); runs from the launcher tests still measure it.
    out = [f"run_dir={run_dir}", f"model.backbone.path={llm}", f"deepspeed.zero_stage={zero}",
           f"deepspeed.precision={precision}", f"checkpoint.every={every}",
           "logging.peak_tflops=0.1"]
    stages = ",".join(f"{{name: s{i}, shards: '{s}', steps: {n}, token_budget: 160, lr: 3e-3, "
                      f"warmup_steps: 2, schedule: cosine}}" for i, (s, n) in enumerate(zip(shards, steps)))
    out.append(f"stages=[{stages}]")
    return out + list(extra)


def rank_entry(fn):
    """For a function torch.multiprocessing.spawn runs per rank: once it returns, the rank ends
    at once with exit code 0 (stdout/stderr flushed). Rarely, the C++ teardown after
    destroy_process_group aborts ("terminate called without an active exception"), which spawn
    would report as a failed rank. A rank that raises still fails the test with its traceback
    (spawn's wrapper catches the exception); called outside a spawned child, it just returns."""

    @functools.wraps(fn)
    def run_then_exit(*args, **kwargs):
        fn(*args, **kwargs)
        if multiprocessing.parent_process() is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    return run_then_exit


# Ranks are forked from one server process that imported what a rank imports, once per test
# session: a fresh interpreter per rank spends ~4 s of a shared core on importing torch,
# DeepSpeed and transformers, and the suite launches ranks about 60 times.
RANK_PRELOAD = ["trainutil", "bdt.train", "bdt.training.ar.loop", "bdt.training.tokenizer.loop",
                "transformers.models.qwen3.modeling_qwen3",
                "deepspeed.runtime.zero.muon.original_muon"]


def spawn_ranks(fn, args: tuple, nprocs: int) -> None:
    """torch.multiprocessing.spawn(fn, args, nprocs), the ranks forked from the preloaded
    server. What a fresh interpreter would inherit from this process now, the server (started
    once) does not have: each rank first takes this process's environment and its stdout and
    stderr of now (a test's S3 endpoint, a changed variable, pytest's capture of the test)."""
    import torch.multiprocessing as mp

    multiprocessing.get_context("forkserver").set_forkserver_preload(RANK_PRELOAD)
    inherited = (dict(os.environ), _Descriptor(1), _Descriptor(2))
    mp.start_processes(_inheriting, args=(inherited, fn, args), nprocs=nprocs, join=True,
                       start_method="forkserver")


class _Descriptor:
    """A file descriptor of this process; a rank receives its own duplicate (multiprocessing
    sends it with the rank's arguments)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        return _received, (DupFd(self.fd),)


def _received(dup) -> int:
    return dup.detach()


def _inheriting(rank: int, inherited: tuple, fn, args: tuple) -> None:
    env, stdout_fd, stderr_fd = inherited
    os.environ.clear()
    os.environ.update(env)
    for fd, target in ((stdout_fd, 1), (stderr_fd, 2)):
        os.dup2(fd, target)
        os.close(fd)
    fn(rank, *args)


def _rank_env(rank: int, world: int, port: int) -> None:
    """The launcher's environment for one rank, and one thread (bitwise-repeatable runs)."""
    import torch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


_loopback_stores: list = []  # a spawned rank's store serves until the process ends


def loopback_gloo_group(rank: int, world: int, port: int, **kwargs) -> None:
    """A gloo process group for a spawned rank (MASTER_ADDR 127.0.0.1), listening on loopback
    only as init_distributed's does: torch's own rank-0 store listens on every interface, and
    gloo binds the address of the host's name. `kwargs` go to init_process_group."""
    import torch.distributed as tdist

    from bdt.training import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed._gloo_on_loopback()
    _loopback_stores.append(distributed._loopback_store(rank, world))
    tdist.init_process_group("gloo", rank=rank, world_size=world, **kwargs)


@rank_entry
def _rank_main(rank: int, world: int, port: int, argv: list[str]) -> None:
    """One rank of a spawned job: the launcher's environment, one thread, then bdt/train.py."""
    _rank_env(rank, world, port)
    from bdt.train import main

    main(argv)


def spawn_train(argv: list[str], world: int = 2) -> int:
    """Run bdt/train.py on `world` CPU ranks (gloo); returns 0 or the failing rank's exit code
    (-9 when it was SIGKILLed)."""
    import torch.multiprocessing as mp

    from bdt.training.distributed import free_port

    try:
        spawn_ranks(_rank_main, (world, free_port(), argv), world)
    except mp.ProcessExitedException as e:
        return e.exit_code
    return 0


def read_metrics(run_dir: str) -> dict[int, dict]:
    """step -> its metrics record with a loss (the last one, should a step hold several)."""
    out: dict[int, dict] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = rec
    return out


def export_tensors(run_dir: str) -> dict:
    from safetensors.torch import load_file

    d = os.path.join(run_dir, "export")
    return {**load_file(os.path.join(d, "llm", "model.safetensors")),
            **load_file(os.path.join(d, "bitdance_extra.safetensors"))}


def tiny_image_tokenizer(out_dir: str, bits: int = 16) -> str:
    """A tiny random image tokenizer directory (testkit.save_tiny_image_tokenizer); returns its path."""
    save_tiny_image_tokenizer(out_dir, bits)
    return out_dir


@rank_entry
def _build_rank_main(rank: int, world: int, port: int, argv: list[str], out_dir: str) -> None:
    """One rank: `model_build.build_model` under the config of `argv`; writes what this rank holds
    (local numel per parameter, full values gathered from the partitions) to out_dir."""
    _rank_env(rank, world, port)
    import deepspeed
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from bdt.config import load
    from bdt.training.ar import model_build
    from bdt.training.deepspeed_config import build_ds_config
    from bdt.training.distributed import init_distributed
    from bdt.training.ar.config import TrainConfig
    from bdt.training.ar.flops import FlopModel

    cfg = OmegaConf.to_object(load(TrainConfig, [argv[1]], argv[2:]))
    init_distributed()
    torch.manual_seed(cfg.seed)
    model, hf_ds = model_build.build_model(cfg, build_ds_config(cfg.deepspeed, cfg.optim, world))
    local = {n: int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
             for n, p in model.named_parameters()}
    full = {}
    for n, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            full[n] = p.detach().clone().contiguous()
    if rank == 0:
        save_file(full, os.path.join(out_dir, "full.safetensors"))
    with open(os.path.join(out_dir, f"local_{rank}.json"), "w") as f:
        json.dump({"local": local, "shape_now": {n: list(p.shape) for n, p in
                                                 model.named_parameters()},
                   "zero3_enabled": hf_ds is not None and hf_ds.is_zero3(),
                   "flops": dataclasses.asdict(FlopModel.for_model(model)),
                   "layer_costs": list(model._layer_costs)}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def spawn_build(argv: list[str], out_dir: str, world: int = 2) -> None:
    from bdt.training.distributed import free_port

    spawn_ranks(_build_rank_main, (world, free_port(), argv, out_dir), world)


def unconsumed_keys(meta, urls, rank, world, seed=3):
    """Keys a saved rank state still owes in its current epoch: buffered + unread ranges."""
    from bdt.data.tars import iter_shard
    from bdt.data.stream_state import unread_ranges

    out = [e["key"] for e in meta["buffer"]]
    for r in unread_ranges(meta, urls, rank, world, seed):
        for index, (raw, _, _) in enumerate(iter_shard(r.shard, r.offset), start=r.index):
            if r.stop is not None and index >= r.stop:
                break
            if index % r.stride == r.phase:
                out.append(raw["__key__"])
    return out


def shard_opens(monkeypatch) -> list[str]:
    """The shards a re-split opens from now on, in order (one entry per open)."""
    import bdt.data.stream_state as stream_state

    opened, read = [], stream_state.read_token_samples

    def counted(url, offset=0):
        opened.append(url)
        return read(url, offset)

    monkeypatch.setattr(stream_state, "read_token_samples", counted)
    return opened
