"""A training step's time by phase and by kernel kind, on the device's timeline: the profile part
of bench/gpu_throughput.py (issue 16 part 3: where a step's time goes when MFU falls short).

Phases (one device sync between them): data, forward, backward, optimizer; the diffusion head's
forward and backward inside them, timed by module hooks. Kernel kinds from torch.profiler's
device time (on CPU: the aten ops' self time), matched by name in the order of KINDS.
"""

from __future__ import annotations

import re
import time

import torch

KINDS = [("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|broadcast"),
         ("attention", r"flex|flash|fmha|attention|attn|softmax"),
         ("optimizer", r"adam|multi_tensor|foreach"),
         ("matmul", r"gemm|matmul|\bmm\b|addmm|bmm|cutlass|cublas|xmma|linear"),
         ("copies", r"memcpy|memset|copy_|to_copy|contiguous"),
         ("elementwise", r".")]


class Clock:
    """Elapsed seconds between marks, on the device's timeline (CUDA events) or the host's."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def head_hooks(head, clock: Clock) -> tuple[dict[str, list], list]:
    """Marks around the diffusion head's forward and backward passes, and the hook handles."""
    marks = {"head_forward": [], "head_backward": []}
    handles = [
        head.register_forward_pre_hook(lambda m, a: marks["head_forward"].append([clock.mark()])),
        head.register_forward_hook(lambda m, a, o: marks["head_forward"][-1].append(clock.mark())),
        head.register_full_backward_pre_hook(
            lambda m, g: marks["head_backward"].append([clock.mark()])),
        head.register_full_backward_hook(
            lambda m, gi, go: marks["head_backward"][-1].append(clock.mark()))]
    return marks, handles


def kernel_kinds(prof, cuda: bool) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Seconds per kernel kind and the 10 longest kernels. On CPU: the aten ops' self time."""
    from torch.autograd import DeviceType

    per_name: dict[str, float] = {}
    if cuda:
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                per_name[e.name] = per_name.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e6
    else:
        for e in prof.key_averages():
            if e.key.startswith("aten::"):
                per_name[e.key] = per_name.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
    kinds = dict.fromkeys((k for k, _ in KINDS), 0.0)
    for name, s in per_name.items():
        kind = next(k for k, pattern in KINDS if re.search(pattern, name, re.IGNORECASE))
        kinds[kind] += s
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:10]
    return kinds, [(name[:90], s) for name, s in top]


def profile(engine, model, rows, budget: int, n: int, clock: Clock) -> dict:
    """Mean seconds per phase of `n` steps on `rows` (anything with next() -> a packed row),
    the head's share of forward and backward, and the device time by kernel kind."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    marks, handles = head_hooks(model.head, clock)
    phases = {k: 0.0 for k in ("data", "forward", "backward", "optimizer")}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(n):
            clock.sync()
            t = [time.perf_counter()]
            packed = rows.next()
            t.append(time.perf_counter())
            losses = engine(packed, row_len=budget)
            clock.sync()
            t.append(time.perf_counter())
            engine.backward(losses["total"])
            clock.sync()
            t.append(time.perf_counter())
            engine.step()
            clock.sync()
            t.append(time.perf_counter())
            for k, a, b in zip(phases, t, t[1:]):
                phases[k] += (b - a) / n
    for handle in handles:
        handle.remove()
    for k, pairs in marks.items():  # inside forward / backward; the head's share of them
        phases[k] = sum(clock.seconds(*pair) for pair in pairs if len(pair) == 2) / n
    kinds, top = kernel_kinds(prof, clock.cuda)
    return {"steps": n, "phases_s": phases,
            "kernel_kinds_s": {k: v / n for k, v in kinds.items()},
            "top_kernels_s": [(name, s / n) for name, s in top]}
