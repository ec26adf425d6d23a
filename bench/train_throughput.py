"""Training throughput, MFU and step-time breakdown of the ~100M config (issue 8 items 3-5).

    .venv/bin/python bench/train_throughput.py [--steps 2] [--budget 1024] [--size 256]
        [--hidden 768 --layers 12 --heads 12 --kv-heads 4 --intermediate 2048]
        [--head-width 384 --head-depth 3] [--peak-n 2048 --peak-seconds 3]

One process, world of one, DeepSpeed ZeRO-0, fp32, 2 threads: the step is the trainer's
(bdt/training/ar/step.py: TokenStream -> SequencePacker -> engine(packed) -> engine.backward ->
engine.step), timed phase by phase. fp32 because it is never slow on these machines: bf16
matmuls are far slower than fp32 on avx2-only CPUs and faster only with avx512_bf16 or AMX (both
peaks are measured and reported; with AMX, bf16 steps of this config ran 1.8x faster, README).

Model: common.LLM_100M (a Qwen3) + common.HEAD_100M: 83M parameters in all, P = 4, 32-bit tokens
(the flags above change its size: the goals speak of the default).
Data: shapes images (`bdt.data.shapes`) at --size px, encoded once by the image tokenizer into
token shards (pre-extracted), and the same images kept as JPEG bytes (on the fly).

Variants, run interleaved step by step on the same engine and the same micro-batches:
  pre-extracted   token shards -> bits (what bdt trains on)
  on-the-fly      the micro-batch's JPEGs decoded, resized and encoded by the tokenizer inside
                  the step (what BitDance and Infinity do), for two encoders: configs/tokenizer/
                  shapes_small.yaml (0.67M) and the released ae_d16c32 geometry (random weights;
                  speed does not depend on them)
MFU: model FLOPs (bdt.training.ar.flops) per second over the fp32 matmul peak of this process,
measured before and after the steps (--peak-n^2 matmuls for --peak-seconds, 2 threads); the mean
is the denominator.
Checkpoint: one save of the engine + stream state (CheckpointManager), timed, and its share of a
step at the configured cadence (checkpoint.every = 1000 in ar_progressive.yaml).
Data path (item 5): the token stream + packing alone, in bursts between steps, in samples/s,
against the samples/s the pre-extracted step consumes.
Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import yaml
from PIL import Image

from common import (CAPTIONS, HEAD_100M, LLM_100M, REPO, Run, add_model_args, goal, model_args,
                    table, write_token_shard)

VARIANTS = ("pre-extracted", "on-the-fly small", "on-the-fly ae_d16c32")
CHECKPOINT_EVERY = 1000


def build_tokenizers() -> dict:
    """Random-weight image tokenizers, only their encoders materialised (the released geometry's
    decoder is most of its ~460M parameters, and encode() never touches it)."""
    from bdt.tokenizer.autoencoder import BinaryAutoencoder
    from bdt.tokenizer.config import TokenizerConfig

    def encoder_only(cfg: TokenizerConfig) -> BinaryAutoencoder:
        with torch.device("meta"):
            model = BinaryAutoencoder(cfg)
        model.encoder.to_empty(device="cpu")
        for p in model.encoder.parameters():
            p.data.normal_(0.0, 0.02)
        return model.eval()

    small = yaml.safe_load(open(os.path.join(REPO, "configs", "tokenizer", "shapes_small.yaml")))["model"]
    torch.manual_seed(0)
    return {"on-the-fly small": encoder_only(TokenizerConfig(**small)),
            "on-the-fly ae_d16c32": encoder_only(TokenizerConfig())}


def to_images(jpegs: list[bytes]) -> torch.Tensor:
    """JPEG bytes (one size) -> [B, 3, H, W] in [-1, 1]."""
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def make_data(out: str, tokenizer, n: int, size: int) -> dict[str, bytes]:
    """A token shard of n shapes images (encoded by `tokenizer`) in out/; returns key -> JPEG."""
    from bdt.data.shapes import make_sample
    from bdt.tokenizer.bits import pack_bits

    jpegs, samples = {}, []
    for i in range(n):
        image, text, _ = make_sample(0, i, [(size, size)])
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=95)
        jpegs[f"s{i:06d}"] = buf.getvalue()  # write_token_shard's keys
        bits_hwC = tokenizer.encode(to_images([buf.getvalue()]))[0]
        samples.append((pack_bits(bits_hwC).numpy(), (size, size), text))
    write_token_shard(os.path.join(out, "000000.tar"), samples, str(size))
    return jpegs


def build_job(tmp: str, budget: int, llm_shape: dict, head: dict):
    from bdt.model.backbone import make_tiny_llm
    from bdt.training.ar import model_build
    from bdt.training.schedule import WarmupSchedule
    from bdt.training.deepspeed_config import (
        DeepSpeedConfig,
        OptimConfig,
        build_ds_config,
        initialize_engine,
    )
    from bdt.training.ar.config import StageConfig, TrainConfig

    llm = make_tiny_llm(os.path.join(tmp, "llm"), CAPTIONS * 20, max_position_embeddings=4096,
                        **llm_shape)
    cfg = TrainConfig(run_dir=os.path.join(tmp, "run"), threads=2)
    cfg.model.backbone.path = llm
    cfg.model.parallel_num, cfg.model.attn_backend, cfg.model.pos_max_len = 4, "sdpa", 64
    for k, v in head.items():
        setattr(cfg.model.head, k, 32 if k == "bits" else v)
    cfg.stages = [StageConfig(name="bench", shards=os.path.join(tmp, "shards"), steps=100,
                              token_budget=budget, warmup_steps=1)]
    cfg.data.buffer_size = 16
    cfg.deepspeed = DeepSpeedConfig(zero_stage=0, precision="fp32", micro_batch_size=1)
    ds = build_ds_config(cfg.deepspeed, OptimConfig(lr=1e-4), 1)
    torch.manual_seed(0)
    model, _ = model_build.build_model(cfg, ds)  # ZeRO-0: no HfDeepSpeedConfig to keep alive
    engine = initialize_engine(model, ds, WarmupSchedule(0, 100, "constant"))
    return cfg, model, engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2, help="measured steps per variant")
    ap.add_argument("--budget", type=int, default=1024, help="packed tokens per micro-batch")
    ap.add_argument("--size", type=int, default=256, help="image side in px (16x tokenizer)")
    add_model_args(ap, LLM_100M, HEAD_100M)
    ap.add_argument("--peak-n", type=int, default=2048, help="side of the peak's matmuls")
    ap.add_argument("--peak-seconds", type=float, default=3.0, help="per peak measurement")
    args = ap.parse_args()
    if min(args.steps, args.budget, args.size, args.peak_n) < 1:
        ap.error("--steps, --budget, --size and --peak-n must be >= 1")
    torch.set_num_threads(2)
    from bdt.data.shard_source import list_shards
    from bdt.model.sequence import ImageSample
    from bdt.tokenizer.bits import to_pm1
    from bdt.training.ar import stage_stream
    from bdt.training.checkpoint import CheckpointManager
    from bdt.training.distributed import cleanup, init_distributed
    from bdt.training.ar.flops import FlopModel, measure_peak_flops
    from bdt.training.ar.stage_rows import image_samples

    with Run("train_throughput") as run, tempfile.TemporaryDirectory() as tmp:
        dist = init_distributed()
        encoders = build_tokenizers()
        jpegs = make_data(os.path.join(tmp, "shards"), encoders["on-the-fly small"], 24, args.size)
        llm_shape, head = model_args(args)
        cfg, model, engine = build_job(tmp, args.budget, llm_shape, head)
        n_params = sum(p.numel() for p in model.parameters())
        shards = list_shards(cfg.stages[0].shards)
        stream, packer = stage_stream.make_stream(cfg, 0, shards, model, dist)
        probe, _ = stage_stream.make_stream(cfg, 0, shards, model, dist)  # data-path bursts only
        flop_model = FlopModel.from_model(model.llm,
                                          sum(p.numel() for p in model.head.parameters()), 1)
        peak_at = dict(n=args.peak_n, seconds=args.peak_seconds)
        peaks = [measure_peak_flops(torch.float32, **peak_at)]
        bf16_peak = measure_peak_flops(torch.bfloat16, **peak_at)

        def step(variant: str) -> dict:
            t = {}
            t0 = time.perf_counter()
            batch = stream.next_batch()
            t["data"] = time.perf_counter() - t0
            samples = image_samples(batch, 32)
            t0 = time.perf_counter()
            if variant != "pre-extracted":  # replace the stored bits by a fresh encode
                bits = encoders[variant].encode(to_images([jpegs[s.key] for s in batch.samples]))
                samples = [ImageSample(caption=s.caption, bits_HWC=to_pm1(b))
                           for s, b in zip(samples, bits)]
            t["encode"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            packed = packer.pack(samples)
            t["data"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            losses = engine(packed)
            t["forward"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            engine.backward(losses["total"])
            t["backward"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            engine.step()
            t["optimizer"] = time.perf_counter() - t0
            t["step"] = sum(t.values())
            lens = (packed.cu_seqlens_S1[1:] - packed.cu_seqlens_S1[:-1]).tolist()
            t["flops"] = flop_model.train_flops(lens, packed.text_target_T.numel(),
                                                packed.image_bits_NC.shape[0])
            t["images"], t["tokens"] = packed.num_samples, batch.tokens
            return t

        def stream_burst(seconds: float = 1.0) -> tuple[int, float]:
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                batch = probe.next_batch()
                packer.pack(image_samples(batch, 32))
                n += len(batch.samples)
            return n, time.perf_counter() - t0

        step(VARIANTS[0])  # warm-up: allocations, first-call paths of the engine
        steps = {v: [] for v in VARIANTS}
        bursts = []
        for _ in range(args.steps):
            for v in VARIANTS:
                steps[v].append(step(v))
                bursts.append(stream_burst())
        ckpt = CheckpointManager(os.path.join(tmp, "ckpt"), dist, keep_last=1)
        t0 = time.perf_counter()
        meta, tensors = stream.state_dict()
        ckpt.save(1, {"model": engine}, {"stream": meta},
                  {f"stream.{k}": v for k, v in tensors.items()})
        checkpoint_s = time.perf_counter() - t0
        peaks.append(measure_peak_flops(torch.float32, **peak_at))
        cleanup()

    peak = statistics.mean(peaks)
    phases = ("data", "encode", "forward", "backward", "optimizer", "step")
    summary = {}
    for v, recs in steps.items():
        s = {k: statistics.mean(r[k] for r in recs) for k in phases}
        s.update(tokens_per_s=sum(r["tokens"] for r in recs) / sum(r["step"] for r in recs),
                 images_per_s=sum(r["images"] for r in recs) / sum(r["step"] for r in recs),
                 mfu=sum(r["flops"] for r in recs) / sum(r["step"] for r in recs) / peak)
        summary[v] = s
    pre = summary["pre-extracted"]
    table(["variant", *[f"{k} s" for k in phases], "tokens/s", "images/s", "MFU"],
          [[v, *[s[k] for k in phases], s["tokens_per_s"], s["images_per_s"], s["mfu"]]
           for v, s in summary.items()],
          f"~{n_params / 1e6:.0f}M params, fp32, ZeRO-0, budget {args.budget}, {args.size} px, "
          f"mean of {args.steps} interleaved steps; peak fp32 {peak / 1e9:.1f} GFLOP/s "
          f"(bf16 {bf16_peak / 1e9:.1f})")
    ckpt_share = checkpoint_s / CHECKPOINT_EVERY / pre["step"]
    print(f"checkpoint save {checkpoint_s:.2f} s = {100 * ckpt_share:.3f}% of a step "
          f"at every={CHECKPOINT_EVERY}")
    stream_rate = sum(n for n, _ in bursts) / sum(s for _, s in bursts)
    headroom = stream_rate / pre["images_per_s"]
    print(f"token stream + packing {stream_rate:.0f} samples/s vs {pre['images_per_s']:.2f} "
          f"consumed: {headroom:.0f}x headroom")
    speedups = {v: pre["images_per_s"] / summary[v]["images_per_s"] for v in VARIANTS[1:]}
    limit_mfu = (f"fp32 on 2 shared cores; small GEMMs (hidden {llm_shape['hidden']}, ~1k tokens) "
                 "and the non-matmul work (norms, RoPE, SiLU, attention softmax, Adam) in the step")
    goals = [
        goal(f"3. training MFU ({n_params / 1e6:.0f}M params, fp32)", f"{pre['mfu']:.1%} of {peak / 1e9:.0f} GFLOP/s",
             ">= 40%", pre["mfu"] >= 0.40, limit_mfu),
        goal("4. pre-extracted vs on-the-fly", ", ".join(f"{v[11:]}: {x:.2f}x"
                                                         for v, x in speedups.items()),
             ">= 2x", max(speedups.values()) >= 2.0,
             "the encoder's cost next to the AR step's: shapes_small's encode is ~1% of a "
             "step (no gain), the released ae_d16c32 encoder's several steps"),
        goal("5a. data path headroom", f"{headroom:.0f}x", ">= 20x", headroom >= 20.0, ""),
    ]
    run.write({"params": n_params, "llm": llm_shape, "head": head, "token_budget": args.budget,
               "image_px": args.size, "steps_per_variant": args.steps, "threads": 2, "precision": "fp32",
               "peak_gflops_fp32": [p / 1e9 for p in peaks], "peak_gflops_bf16": bf16_peak / 1e9,
               "variants": summary, "speedup_vs_on_the_fly": speedups,
               "checkpoint_s": checkpoint_s, "checkpoint_share_at_every_1000": ckpt_share,
               "stream_samples_per_s": stream_rate, "data_headroom": headroom,
               "steps": steps}, goals)


if __name__ == "__main__":
    main()
