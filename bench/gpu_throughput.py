"""Training throughput and MFU of the 1.2B configuration per attention backend, a profile of the
best one's step, and the attention kernels alone (issue 16 parts 1 and 3; scripts/gpu_check.sh).

    python bench/gpu_throughput.py --llm DIR [--backends sdpa,varlen,flash,flex] [--compile best]
        [--steps 6]
        [--budget 16384] [--hidden 2048 --layers 24 --heads 16 --kv-heads 8 --intermediate 5632]
        [--head-width 1024 --head-depth 4] [--seconds 150] [--name gpu_throughput]

One process (world of one), DeepSpeed ZeRO-2, bf16, P = 4: the first GPU run's setup. The
backbone is a Qwen3 of the given shape built from scratch around --llm's tokenizer (random
weights and random image bits: a step's cost depends on neither). Rows are shapes-like samples
(a 4-12 token caption + 8x8 tokens of 32 bits, ~85 tokens each) packed to the budget by the
trainer's packer; building them is the `data` phase here. The real token stream's share of a
step (`data_wait_frac`) is measured by the trainer run that scripts/gpu_check.sh makes.

Per backend, on the same engine: 2 warm-up steps (the first compiles flex), then --steps timed
steps (one device sync per step): tokens/s and MFU = model FLOPs (bdt.training.ar.flops, as the
trainer counts them) / step time / the bf16 matmul peak measured in this process before and
after. varlen and flash run every block-causal row (all of them at P = 4) through flex.
Profile of the fastest backend: --profile-steps steps with a device sync between phases (data,
forward, backward, optimizer; the diffusion head's forward and backward inside them, timed by
module hooks), and torch.profiler's device time by kernel kind (matmul, attention, elementwise,
optimizer, communication, copies).
Attention alone: forward + backward at the budget on causal rows of 85-token documents (P = 1,
where varlen and flash are exact): sdpa on one row per document (what the model does), varlen,
flash where present, flex.
Last, --compile's backends (default: the fastest) again, as `<backend>+compile`, with the
decoder layers and the head compiled by Inductor (BitDanceModel.compile_blocks, the trainer's
`compile.enabled`); their warm-up (2 steps longer) holds the build and any recompile.
Order: what runs no flex first (the backends but flex, varlen and flash, then the kernels alone
but flex), then the backends that run flex, flex leading (a flex that hangs is named as flex's),
the profile, flex's kernel alone, the compiled ones. flex hung on the first GPU run, and a hang
ends the process at the stage's timeout: the parts before it are kept, as the results are
written after each part, and before each backend's steps, so one that hangs is in it as not
finished.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import Run, add_model_args, goal, table
from step_profile import Clock, profile


def build(args, device: torch.device):
    """The model + DeepSpeed engine (ZeRO-2, bf16 where the device has it)."""
    from bdt.model.ar import BitDanceModel
    from bdt.model.backbone_config import BackboneConfig
    from bdt.model.config import ModelConfig
    from bdt.model.head import HeadConfig
    from bdt.training.deepspeed_config import (DeepSpeedConfig, OptimConfig, build_ds_config,
                                              initialize_engine)
    from bdt.training.schedule import WarmupSchedule

    shape = dict(hidden_size=args.hidden, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                 head_dim=args.hidden // args.heads, intermediate_size=args.intermediate,
                 max_position_embeddings=max(8192, args.budget))
    cfg = ModelConfig(backbone=BackboneConfig(path=args.llm, from_scratch=True,
                                              config_overrides=shape),
                      head=HeadConfig(width=args.head_width, depth=args.head_depth,
                                      num_adaln_sets=2, head_dim=64, bits=32),
                      parallel_num=4, pos_max_len=64, attn_backend="sdpa")
    torch.manual_seed(0)
    model = BitDanceModel.from_config(cfg)
    ds = build_ds_config(DeepSpeedConfig(zero_stage=2, precision=args.precision,
                                         micro_batch_size=1), OptimConfig(lr=1e-4), 1)
    return model, initialize_engine(model, ds, WarmupSchedule(0, 10 ** 6, "constant"))


class Rows:
    """Shapes-like packed rows of about `budget` tokens (random caption ids and bits)."""

    def __init__(self, model, budget: int, seed: int = 0):
        from bdt.model.sequence import SequencePacker

        self.packer = SequencePacker(model.special, model.prompt, 4, max_len=budget)
        self.budget, self.g = budget, torch.Generator().manual_seed(seed)
        self.vocab = model.special.vocab_size

    def next(self):
        from bdt.model.sequence import ImageSample

        samples, used = [], 0
        while True:
            n = int(torch.randint(4, 13, (), generator=self.g))
            length = self.packer.sample_len(len(self.packer.prompt_ids([0] * n)), 8, 8)
            if used + length > self.budget:
                return self.packer.pack(samples, self.g)
            ids = torch.randint(self.vocab, (n,), generator=self.g).tolist()
            bits = torch.where(torch.rand(8, 8, 32, generator=self.g) > 0.5, 1.0, -1.0)
            samples.append(ImageSample(ids, bits))
            used += length


def timed_steps(engine, rows: Rows, budget: int, n: int, flops, clock: Clock) -> list[dict]:
    out = []
    for _ in range(n):
        clock.sync()
        t0 = time.perf_counter()
        packed = rows.next()
        losses = engine(packed, row_len=budget)
        engine.backward(losses["total"])
        engine.step()
        clock.sync()
        out.append({"s": time.perf_counter() - t0, "tokens": int(packed.cu_seqlens_S1[-1]),
                    "images": packed.num_samples, "flops": flops.packed_flops(packed)})
    return out


def summarize(recs: list[dict], peak: float) -> dict:
    s = sum(r["s"] for r in recs)
    return {"steps": len(recs), "step_s": statistics.median(r["s"] for r in recs),
            "tokens_per_s": sum(r["tokens"] for r in recs) / s,
            "images_per_s": sum(r["images"] for r in recs) / s,
            "mfu": sum(r["flops"] for r in recs) / s / peak}


def attention_call(name: str, qkv: list[torch.Tensor], cu: list[int], L: int, device):
    """A no-argument forward of kernel `name` on q, k, v [1, heads, T, d] (T = cu[-1] tokens,
    causal documents), and the leaf tensors its backward fills."""
    import torch.nn.functional as F

    from bdt.model import attention_kernels as kernels
    from bdt.model.attention import VarlenPlan
    from bdt.model.attention_masks import BlockCausalLayout, per_document_rows

    lens = [b - a for a, b in zip(cu, cu[1:])]
    d = qkv[0].shape[-1]
    if name == "sdpa":  # what the model does with sdpa: one padded row per document
        rows, index = per_document_rows(cu, lens, [1] * len(lens), 1.0, 1.0)
        S, Lmax = rows.doc_ids_BL.shape
        mask, index = rows.to(device).dense_mask(), index.to(device)
        leaves = [x.detach().clone().requires_grad_() for x in qkv]

        def per_doc(x):  # [1, h, T, d] -> [S, h, Lmax, d]
            flat = x[0].transpose(0, 1)
            rows_ = flat.new_zeros(S * Lmax, *flat.shape[1:]).index_copy(0, index, flat)
            return rows_.view(S, Lmax, -1, d).transpose(1, 2)
        return (lambda: F.scaled_dot_product_attention(
            *(per_doc(x) for x in leaves), attn_mask=mask, enable_gqa=True)), leaves
    if name == "flex":
        block_mask = BlockCausalLayout.from_packed(cu, lens, 1, total_len=L).to(device).block_mask()
        leaves = [F.pad(x.detach(), (0, 0, 0, L - x.shape[2])).requires_grad_() for x in qkv]
        return (lambda: kernels.flex(*leaves, block_mask, None)), leaves
    plan = VarlenPlan(name, torch.tensor(cu, dtype=torch.int32, device=device), max(lens))
    fn = kernels.torch_varlen if name == "varlen" else kernels.flash_varlen
    leaves = [x[0].transpose(0, 1).contiguous().requires_grad_() for x in qkv]
    return (lambda: fn(*leaves, plan, None)), leaves


def attention_alone(args, device: torch.device, clock: Clock, seconds_left,
                    names: tuple[str, ...]) -> dict:
    """Forward + backward of each kernel of `names` on causal rows of 85-token documents at the
    budget."""
    from bdt.model.attention import flash_available, varlen_available

    cu = list(range(0, args.budget - 84, 85))
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    d = args.hidden // args.heads
    qkv = [torch.randn(1, h, cu[-1], d, generator=g).to(device, dtype)
           for h in (args.heads, args.kv_heads, args.kv_heads)]
    available = {"sdpa": True, "flex": clock.cuda, "varlen": varlen_available(),
                 "flash": flash_available()}
    out = {}
    for name in names:
        ok = available[name]
        if not ok or seconds_left() < 20:
            out[name] = "not available here" if not ok else "skipped: out of time"
            continue
        try:
            run, _ = attention_call(name, qkv, cu, args.budget, device)
            times = []
            for _ in range(4):  # the first compiles / picks kernels
                clock.sync()
                t0 = time.perf_counter()
                run().float().square().mean().backward()
                clock.sync()
                times.append(time.perf_counter() - t0)
            out[name] = {"first_s": times[0], "fwd_bwd_ms": 1e3 * statistics.median(times[1:])}
        except Exception as e:  # a kernel that fails here is a result to record, not a crash
            out[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


COMPILED = "+compile"
# Backends that run flex: varlen and flash for every block-causal row (all rows at P = 4).
RUNS_FLEX = ("flex", "varlen", "flash")


def fastest(results: dict, labels: list[str]) -> str | None:
    """The label among `labels` with the most tokens/s, of those measured."""
    measured = [b for b in labels if "mfu" in results["backends"].get(b, {})]
    return max(measured, key=lambda b: results["backends"][b]["tokens_per_s"], default=None)


def to_compile(spec: str, results: dict, backends: list[str]) -> list[str]:
    """The backends --compile names: "best" = the fastest eager one, "none", or a list."""
    if spec == "none":
        return []
    if spec != "best":
        return spec.split(",")
    best = fastest(results, backends)
    return [best] if best else []


def flex_line(results: dict) -> str:
    r = results["backends"].get("flex", {"skipped": "not run"})
    if "mfu" not in r:
        return next(iter(r.values()))
    return (f"{r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']:.1%}, first step (compile) "
            f"{r['first_step_s']:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llm", required=True, help="a tiny LLM dir (its tokenizer is used)")
    ap.add_argument("--backends", default="sdpa,varlen,flash,flex")
    ap.add_argument("--compile", default="best",
                    help="backends measured again with compiled decoder layers and head "
                         "(Inductor; the trainer's compile.enabled): best (the fastest eager "
                         "one), none, or a comma list")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--budget", type=int, default=16384)
    add_model_args(ap, dict(hidden=2048, layers=24, heads=16, kv_heads=8, intermediate=5632),
                   dict(width=1024, depth=4))
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--seconds", type=float, default=150.0,
                    help="start no new part after this many seconds (the caller's timeout is "
                         "the hard bound)")
    ap.add_argument("--name", default="gpu_throughput")
    args = ap.parse_args()
    from bdt.training.distributed import cleanup, init_distributed
    from bdt.training.ar.flops import FlopModel, measure_peak_flops

    started = time.monotonic()
    seconds_left = lambda: args.seconds - (time.monotonic() - started)  # noqa: E731
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    with Run(args.name) as run:
        dist = init_distributed()
        clock = Clock(dist.device)
        peaks = [measure_peak_flops(dtype, device=dist.device)]
        model, engine = build(args, dist.device)
        flops, rows = FlopModel.for_model(model), Rows(model, args.budget)
        params = sum(p.numel() for p in model.parameters())
        results = {"params": params, "budget": args.budget, "precision": args.precision,
                   "device": torch.cuda.get_device_name(0) if clock.cuda else "cpu",
                   "torch": torch.__version__, "backends": {}}

        def write():
            peak = statistics.mean(peaks)
            best = fastest(results, list(results["backends"]))
            mfu = results["backends"][best]["mfu"] if best else 0.0
            results.update(peak_tflops=[p / 1e12 for p in peaks], best_backend=best)
            value = (f"{best}: {mfu:.1%} of {peak / 1e12:.3g} TFLOP/s "
                     f"({params / 1e6:.0f}M params, budget {args.budget})" if best else "none ran")
            run.write(results, [goal("16.3 training MFU on one GPU (best backend)", value,
                                     ">= 40%", mfu >= 0.40,
                                     "see the profile: phases and kernel kinds"),
                                goal("16.1 flex trains (1.2B, one GPU)", flex_line(results),
                                     "steps", "mfu" in results["backends"].get("flex", {}))])

        def measure(backend: str, label: str, warmup: int) -> None:
            """Warm-up and timed steps of the engine as it is, under `backend`, as `label`."""
            if seconds_left() < 30:
                results["backends"][label] = {"skipped": "out of time"}
                return
            try:
                model.set_attn_backend(backend)
            except ValueError as e:
                results["backends"][label] = {"skipped": str(e)}
                return
            # On record before it runs: a backend that hangs (flex, on the first GPU run) until
            # the stage's timeout kills the process is in the JSON as that, not as "not run".
            results["backends"][label] = {"failed": "did not finish: hung or killed (the "
                                                    "stage's log has the stacks)"}
            write()
            print(f"== {label}: warm-up", flush=True)
            t0 = time.perf_counter()
            try:
                warm = timed_steps(engine, rows, args.budget, warmup, flops, clock)
                recs = timed_steps(engine, rows, args.budget, args.steps, flops, clock)
            except Exception as e:  # a backend that fails is a result; the others still run
                results["backends"][label] = {
                    "failed": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                write()
                return
            r = summarize(recs, statistics.mean(peaks))
            r.update(first_step_s=warm[0]["s"] if warm else None,
                     warmup_s=time.perf_counter() - t0 - sum(x["s"] for x in recs))
            results["backends"][label] = r
            print(f"   {label}: {r['step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s, "
                  f"MFU {r['mfu']:.1%} (first step {r['first_step_s']:.1f} s)", flush=True)
            write()

        backends = args.backends.split(",")
        alone = results["attention_alone"] = {}

        def kernels_alone(names: tuple[str, ...]) -> None:
            if seconds_left() > 20:
                alone.update(attention_alone(args, dist.device, clock, seconds_left, names))
                write()

        for backend in [b for b in backends if b not in RUNS_FLEX]:
            measure(backend, backend, args.warmup)
        kernels_alone(("sdpa", "varlen", "flash"))
        for backend in [b for b in RUNS_FLEX if b in backends]:
            measure(backend, backend, args.warmup)
        peaks.append(measure_peak_flops(dtype, device=dist.device))
        write()
        best = fastest(results, backends)
        if best and args.profile_steps and seconds_left() > 20:
            model.set_attn_backend(best)
            results["profile"] = dict(backend=best, **profile(
                engine, model, rows, args.budget, args.profile_steps, clock))
            write()
        kernels_alone(("flex",))
        # Last (the build is the slowest part): compiled decoder layers + head, the trainer's
        # compile.enabled, on the same engine; compiled after the backend is set (flex layers
        # compile for static shapes, the others for symbolic ones); a longer warm-up, as
        # Inductor may recompile once more.
        for backend in to_compile(args.compile, results, backends):
            try:
                model.set_attn_backend(backend)
            except ValueError as e:
                results["backends"][backend + COMPILED] = {"skipped": str(e)}
                continue
            model.compile_blocks()
            measure(backend, backend + COMPILED, args.warmup + 2)
        cleanup()

    measured = {b: r for b, r in results["backends"].items() if "mfu" in r}
    table(["backend", "s/step", "tokens/s", "images/s", "MFU", "first step s"],
          [[b, r["step_s"], r["tokens_per_s"], r["images_per_s"], r["mfu"], r["first_step_s"]]
           for b, r in measured.items()],
          f"{params / 1e6:.1f}M params, {args.precision}, ZeRO-2, budget {args.budget}, "
          f"{results['device']}; peak {' / '.join(f'{p:.3g}' for p in results['peak_tflops'])} "
          "TFLOP/s (before / after)")
    for b, r in results["backends"].items():
        if "mfu" not in r:
            print(f"{b}: {r}")
    if "profile" in results:
        p = results["profile"]
        table(["phase", "s"], list(p["phases_s"].items()), f"profile of {p['backend']} per step")
        table(["kernel kind", "s"], list(p["kernel_kinds_s"].items()))
        table(["kernel", "s"], p["top_kernels_s"])
    print("attention alone (fwd+bwd):", results["attention_alone"])


if __name__ == "__main__":
    main()
