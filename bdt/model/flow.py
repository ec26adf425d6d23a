"""Rectified flow for the binary diffusion head (method §3): training loss and the sampler.

Convention: t = 1 at data, z_t = (1 - t) * eps + t * x, with x the clean +-1 bits. The head predicts
x; both the loss and the sampler work with the velocity v = (x - z_t) / max(1 - t, 0.05), the clamp
keeping the velocity finite near t = 1.

Reproducibility: with the same seed, `flow_loss` and `sample` draw their random numbers in the
release's order (documented in tests/fixtures/bitdance/head_tiny.json), so the fixtures' seeded loss
and sampler outputs are reproduced exactly (torch CPU RNG).

Binarisation is the caller's: `bits = binarize(x)`. The release applies `torch.sign` to the
sample, which maps an exact 0 to 0 (a third, invalid bit value); we map x >= 0 to +1 instead so the
output is always a valid +-1 token. The tokenizer uses the strict `> 0` (0 -> -1), but for a
sampler output exact zeros have probability ~0, so any tie rule gives the release's bits in
practice; what matters is never emitting a 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bdt.model.head import DiffusionHead

# The sampler integrates the SDE to t = 1 - LAST_STEP and finishes with one deterministic Euler
# step (the velocity is least reliable near t = 1, where the clamp dominates).
LAST_STEP = 0.05
VELOCITY_CLAMP = 0.05


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Time shift t -> (1/s) / ((1/s) + (1/t - 1)); s > 1 spends more steps near noise (t = 0)."""
    return (1 / shift) / ((1 / shift) + (1 / t - 1))


def velocity(x_pred: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
    """v = (x_pred - z_t) / max(1 - t, 0.05); t broadcastable to z_t."""
    return (x_pred - z_t) / (1 - t).clamp_min(VELOCITY_CLAMP)


def sample_train_time(n: int, head: DiffusionHead, device: torch.device,
                      generator: torch.Generator | None = None) -> Tensor:
    """Flow times, one per patch [n]: logit-normal sigmoid(N(p_mean, p_std^2)) or uniform
    U[0, 1) (head.cfg.time_schedule), then shifted."""
    cfg = head.cfg
    if cfg.time_schedule == "uniform":
        t = torch.rand(n, device=device, generator=generator)
    else:
        t = (torch.randn(n, device=device, generator=generator) * cfg.p_std + cfg.p_mean).sigmoid()
    # The release skips the shift at s = 1 (an identity up to rounding); so do we, bit for bit.
    return shift_time(t, cfg.time_shift) if cfg.time_shift != 1.0 else t


def flow_loss(head: DiffusionHead, x_BPC: Tensor, cond_BPD: Tensor,
              generator: torch.Generator | None = None,
              return_x_pred: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Velocity-space MSE, mean over bits, unreduced per token: [B, P].

    One t per patch row. With head.cfg.repeat = r > 1 every patch is scored r times with fresh
    (t, noise) and the r losses are averaged (more head work per backbone pass). RNG order: all
    B*r normals for t first, then all B*r*P*C noise normals. With `return_x_pred`, also the
    head's x-prediction [r*B, P, C] (the r repeats stacked along B), for diagnostics.
    """
    r = head.cfg.repeat
    B = x_BPC.shape[0]
    x_BPC = x_BPC.float()
    if r > 1:
        x_BPC = x_BPC.repeat(r, 1, 1)
        cond_BPD = cond_BPD.repeat(r, 1, 1)
    with torch.no_grad():
        t_B = sample_train_time(x_BPC.shape[0], head, x_BPC.device, generator)
        eps_BPC = torch.randn(x_BPC.shape, device=x_BPC.device, generator=generator)
        t_B11 = t_B[:, None, None]
        z_BPC = (1 - t_B11) * eps_BPC + t_B11 * x_BPC
        v_BPC = velocity(x_BPC, z_BPC, t_B11)
    x_pred_BPC = head(z_BPC.to(cond_BPD.dtype), t_B, cond_BPD)
    # The loss in fp32 whatever the autocast dtype of the head.
    loss_BP = (v_BPC - velocity(x_pred_BPC.float(), z_BPC, t_B11)).square().mean(dim=-1)
    loss_BP = loss_BP.view(r, B, -1).mean(dim=0) if r > 1 else loss_BP
    return (loss_BP, x_pred_BPC) if return_x_pred else loss_BP


def bit_accuracy(x_pred: Tensor, x: Tensor) -> Tensor:
    """Fraction of bits whose sign agrees with the +-1 target (diagnostic; x_pred 0 counts +1)."""
    return (binarize(x_pred) == x.sign()).float().mean()


def binarize(x: Tensor) -> Tensor:
    """Sampler output -> +-1 bits; x >= 0 -> +1 (never 0, unlike torch.sign; see module doc)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def time_grid(num_steps: int, time_shift: float) -> tuple[Tensor, Tensor]:
    """The sampler's (t_i, dt_i), each [num_steps], float32.

    t runs from 0 to 1 - LAST_STEP on a shifted linspace. Like the release, t_i is the float32
    running sum of the dt's (not the grid itself); the shift is applied even at s = 1, where it
    changes the last bits of the grid. Both matter only for bit-exact reproduction.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    grid = shift_time(torch.linspace(0, 1 - LAST_STEP, num_steps + 1, dtype=torch.float32),
                      time_shift)
    dt = grid[1:] - grid[:-1]
    t = torch.zeros(num_steps, dtype=torch.float32)
    running = torch.zeros((), dtype=torch.float32)
    for i in range(num_steps):
        t[i] = running
        running = running + dt[i]
    return t, dt


def cfg_schedule(scale: float, num: int, kind: str = "constant") -> list[float]:
    """Guidance scales for `num` consecutive calls: constant, or rising linearly to `scale`
    (call i of num uses 1 + (scale - 1)(i + 1) / num: past 1 at the first, `scale` at the last)."""
    if kind == "constant":
        return [float(scale)] * num
    if kind == "linear":
        return [1.0 + (scale - 1.0) * (i + 1) / num for i in range(num)]
    raise ValueError(f"unknown CFG schedule {kind!r}; expected 'constant' or 'linear'")


@torch.no_grad()
def sample(head: DiffusionHead, cond_BPD: Tensor, uncond_BPD: Tensor | None = None,
           cfg_scale: float | Sequence[float] = 1.0, num_steps: int = 50,
           time_shift: float | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """Euler-Maruyama sampling of one patch per row: returns x [B, P, C] (not binarised).

    With `uncond_BPD` both streams go through the head in one batch and the velocity is guided,
    v = v_u + s (v_c - v_u). `cfg_scale` is one float or one scale per head call
    (num_steps + 1: the SDE steps, then the final Euler step). time_shift defaults to the head's.
    RNG order (the release's): the initial noise, then one normal draw per SDE step.
    """
    scales = ([float(cfg_scale)] * (num_steps + 1) if isinstance(cfg_scale, (int, float))
              else [float(s) for s in cfg_scale])
    if len(scales) != num_steps + 1:
        raise ValueError(f"cfg_scale schedule needs num_steps + 1 = {num_steps + 1} values, "
                         f"got {len(scales)}")
    if uncond_BPD is None and any(s != 1.0 for s in scales):
        raise ValueError("cfg_scale != 1 needs the unconditional condition uncond_BPD")
    if uncond_BPD is not None and uncond_BPD.shape != cond_BPD.shape:
        raise ValueError(f"uncond_BPD {list(uncond_BPD.shape)} must match cond_BPD "
                         f"{list(cond_BPD.shape)}")
    B, P, _ = cond_BPD.shape
    device = cond_BPD.device
    streams = 1 if uncond_BPD is None else 2
    c_BPD = cond_BPD if uncond_BPD is None else torch.cat([cond_BPD, uncond_BPD])
    t_steps, dt_steps = time_grid(num_steps, head.cfg.time_shift if time_shift is None
                                  else time_shift)

    def guided_velocity(x_BPC: Tensor, t: Tensor, scale: float) -> Tensor:
        x_in = x_BPC.repeat(streams, 1, 1)
        x_pred = head(x_in.to(c_BPD.dtype), t.expand(streams * B), c_BPD).float()
        v = velocity(x_pred, x_in, t)
        if streams == 1:
            return v
        v_c, v_u = v.chunk(2)
        return v_u + scale * (v_c - v_u)

    x_BPC = torch.randn((B, P, head.cfg.bits), device=device, generator=generator)
    for i in range(num_steps):
        t, dt = t_steps[i].to(device), dt_steps[i].to(device)
        v = guided_velocity(x_BPC, t, scales[i])
        # Score of the Gaussian path z_t = (1-t) eps + t x given the velocity, then the
        # Euler-Maruyama step of the SDE whose marginals match the ODE's (diffusion 2(1-t)).
        score = (t * v - x_BPC) / ((1 - t) ** 2 + t * (1 - t))
        drift = v + (1 - t) * score
        noise = torch.randn(x_BPC.shape, device=device, generator=generator)
        x_BPC = x_BPC + drift * dt + (2 * (1 - t) * dt).sqrt() * noise
    t_last = torch.tensor(1 - LAST_STEP, dtype=torch.float32, device=device)
    return x_BPC + guided_velocity(x_BPC, t_last, scales[-1]) * LAST_STEP
