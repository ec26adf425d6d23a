"""The binary diffusion head (method §3): denoises the P tokens of one patch jointly.

Per patch row b the head gets the noisy bits x_t [P, C], the flow time t (one per patch) and one
condition vector per token (LLM hidden state + 2D position embedding, [P, D]). It is a small
transformer over the P tokens: pre-LayerNorm blocks modulated by adaLN (scale, shift, gate)
computed from SiLU(time_emb + cond_emb), bidirectional attention among the P tokens, an MLP of
hidden H = int(1.5*W) (`mlp`: "swiglu" = Linear(W -> 2H) [gate | up] -> SiLU(gate)*up ->
Linear(H -> W), or "plain" = Linear(W -> H) -> SiLU -> Linear(H -> W), all with biases), and a
zero-initialised final adaLN + Linear(W -> C). The output is an x-prediction squashed to (-1, 1)
by 2*sigmoid - 1 (the data are +-1 bits).

The adaLN projections are shared: `num_adaln_sets` Linear(W -> 6W) for `depth` blocks, block i
using set i // (depth / num_adaln_sets) (BitDance shares them between consecutive blocks to save
parameters; with W = 5120 one set is 157M parameters).

Parameter names are ours; `head_key_from_bitdance` / `head_state_dict_from_bitdance` map the
released checkpoint's `DiffHead` keys (`net.*`, see tests/fixtures/bitdance/head_tiny.json and the
`vision_diffusion_head.net.*` keys of mllm_keys_14b.json) onto them, shapes unchanged, and
`head_config_from_bitdance` reads a released `DiffHead`'s constructor arguments
(vision_head_config.json).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


# The MLP of a block, and the released state-dict names of its two Linears (`use_swiglu`
# True / False); the SiLU between the plain Linears is the Sequential's index 1.
MLP_KINDS: dict[str, tuple[str, str]] = {"swiglu": ("w1", "w2"), "plain": ("mlp.0", "mlp.2")}
TIME_SCHEDULES = ("logit_normal", "uniform")
# Upper limits, ~6-40x the released heads (W 5120, depth 6, C 32, P 64, 256 time features):
# far more is a typo or a hostile file, and was found only as an allocator error once the LLM
# had loaded (width 1e9: 'tried to allocate 1024000000000 bytes', naming no key).
_LIMITS = {"width": 32768, "depth": 256, "num_adaln_sets": 256, "head_dim": 32768, "bits": 1024,
           "cond_dim": 65536, "tokens": 4096, "time_freq_dim": 65536, "repeat": 256}


@dataclass
class HeadConfig:
    """Diffusion head hyperparameters; defaults are BitDance-14B's head (16 tokens per step)."""

    width: int = 5120  # W, the head's channel width
    depth: int = 6  # transformer blocks
    num_adaln_sets: int = 2  # shared adaLN projections; depth must be a multiple
    head_dim: int = 128  # attention head size (BitDance: n_heads = W // 128)
    mlp_ratio: float = 1.5  # MLP hidden H = int(mlp_ratio * W)
    # swiglu | plain (module docstring). The released DiffHead defaults to plain, but every
    # released checkpoint (BitDance-14B 16x and 64x) is SwiGLU, and so is every bdt config and
    # checkpoint written before this key existed: a plain default would break loading them.
    mlp: str = "swiglu"
    bits: int = 32  # C, bits per image token (ae_d16c32)
    cond_dim: int = 5120  # D, the condition width (the LLM hidden size)
    tokens: int = 16  # P, tokens per patch (= per AR step); the network itself takes any P
    time_freq_dim: int = 256  # sinusoidal timestep features fed to the time MLP
    # Training-time flow time (method §3): logit_normal t = sigmoid(N(p_mean, p_std^2)), or
    # uniform t = U[0, 1); then shifted.
    time_schedule: str = "logit_normal"
    p_mean: float = -0.8
    p_std: float = 0.8
    time_shift: float = 1.0
    # "diff_batch_mul": score each clean patch this many times with fresh (t, noise) per step.
    repeat: int = 1

    def validate(self) -> None:
        """Raise ValueError naming the first bad key (as `model.head.<key>`)."""
        for key in ("width", "depth", "num_adaln_sets", "head_dim", "bits", "cond_dim", "tokens",
                    "time_freq_dim", "repeat"):
            if not 1 <= getattr(self, key) <= _LIMITS[key]:
                raise ValueError(f"model.head.{key} must be in [1, {_LIMITS[key]}], got "
                                 f"{getattr(self, key)}")
        if self.width % self.head_dim:
            raise ValueError(f"model.head.width ({self.width}) must be a multiple of "
                             f"model.head.head_dim ({self.head_dim})")
        # As in the release: fewer blocks than sets is allowed (set i serves block i, the rest
        # stay unused); more must split evenly.
        if self.depth > self.num_adaln_sets and self.depth % self.num_adaln_sets:
            raise ValueError(f"model.head.depth ({self.depth}) must be a multiple of "
                             f"model.head.num_adaln_sets ({self.num_adaln_sets}) or at most it")
        for key, allowed in (("mlp", tuple(MLP_KINDS)), ("time_schedule", TIME_SCHEDULES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.head.{key} must be one of {', '.join(allowed)}, got "
                                 f"{getattr(self, key)!r}")
        if self.time_freq_dim % 2:
            raise ValueError(f"model.head.time_freq_dim must be even, got {self.time_freq_dim}")
        # `not > 0` (and the finite checks) refuse NaN and inf, which fail no comparison above.
        if not (0 < self.p_std < math.inf and 0 < self.time_shift < math.inf
                and 0 < self.mlp_ratio < math.inf):
            raise ValueError("model.head.p_std, time_shift and mlp_ratio must be finite and > 0, "
                             f"got {self.p_std}, {self.time_shift}, {self.mlp_ratio}")
        if not math.isfinite(self.p_mean):
            raise ValueError(f"model.head.p_mean must be a finite number, got {self.p_mean}")


def timestep_embedding(t_B: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of 1000*t, [B, dim]: cos first, then sin (the release's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args_BH = (1000.0 * t_B.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args_BH), torch.sin(args_BH)], dim=-1)


def _modulate(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class HeadBlock(nn.Module):
    """Pre-LN transformer block over the P tokens of a patch, modulated by adaLN."""

    def __init__(self, width: int, head_dim: int, mlp_hidden: int, mlp: str = "swiglu"):
        super().__init__()
        self.head_dim = head_dim
        self.gated = mlp == "swiglu"
        self.attn_norm = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width, eps=1e-6)
        # SwiGLU: one Linear gives [gate | up], gate first; plain: the hidden layer itself.
        self.mlp_in = nn.Linear(width, (2 if self.gated else 1) * mlp_hidden)
        self.mlp_out = nn.Linear(mlp_hidden, width)

    def forward(self, x_BPW: Tensor, mod_BP6W: Tensor) -> Tensor:
        # Row layout of an adaLN set's output (the release's): scale, shift, gate for the
        # attention branch, then the same three for the MLP branch.
        scale1, shift1, gate1, scale2, shift2, gate2 = mod_BP6W.chunk(6, dim=-1)
        B, P, W = x_BPW.shape
        h = _modulate(self.attn_norm(x_BPW), scale1, shift1)
        q, k, v = (t.view(B, P, W // self.head_dim, self.head_dim).transpose(1, 2)
                   for t in self.qkv(h).chunk(3, dim=-1))
        # No mask: all P tokens of a patch see each other (joint denoising, method §3).
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, P, W)
        x_BPW = x_BPW + gate1 * self.attn_out(h)
        h = self.mlp_in(_modulate(self.mlp_norm(x_BPW), scale2, shift2))
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.silu(h)
        return x_BPW + gate2 * self.mlp_out(h)


class DiffusionHead(nn.Module):
    """x-prediction network: forward(x_t [B,P,C], t [B], cond [B,P,D]) -> x_pred [B,P,C]."""

    def __init__(self, cfg: HeadConfig, activation_checkpointing: bool = False):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        W = cfg.width
        self.time_mlp_in = nn.Linear(cfg.time_freq_dim, W)
        self.time_mlp_out = nn.Linear(W, W)
        self.cond_proj = nn.Linear(cfg.cond_dim, W)
        self.input_proj = nn.Linear(cfg.bits, W)
        self.blocks = nn.ModuleList(
            HeadBlock(W, cfg.head_dim, int(cfg.mlp_ratio * W), cfg.mlp) for _ in range(cfg.depth))
        self.adaln_sets = nn.ModuleList(nn.Linear(W, 6 * W) for _ in range(cfg.num_adaln_sets))
        self.final_norm = nn.LayerNorm(W, eps=1e-6, elementwise_affine=False)
        self.final_adaln = nn.Linear(W, 2 * W)  # rows: scale, shift
        self.final_proj = nn.Linear(W, cfg.bits)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT-style init: xavier Linears, N(0, 0.02) time MLP, zero adaLN and output layer.

        Zero adaLN gates make every block the identity at init and the zero output layer makes
        x_pred = 2*sigmoid(0) - 1 = 0 (the mean of the +-1 bits) before any training.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_mlp_in.weight, std=0.02)
        nn.init.normal_(self.time_mlp_out.weight, std=0.02)
        for layer in [*self.adaln_sets, self.final_adaln, self.final_proj]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t_BPC: Tensor, t_B: Tensor, cond_BPD: Tensor) -> Tensor:
        cfg = self.cfg
        if x_t_BPC.shape[-1] != cfg.bits or cond_BPD.shape[-1] != cfg.cond_dim:
            raise ValueError(f"diffusion head expects x_t [B,P,{cfg.bits}] and cond "
                             f"[B,P,{cfg.cond_dim}], got {list(x_t_BPC.shape)} and "
                             f"{list(cond_BPD.shape)}")
        t_freq = timestep_embedding(t_B, cfg.time_freq_dim).to(x_t_BPC.dtype)
        t_emb_B1W = self.time_mlp_out(F.silu(self.time_mlp_in(t_freq)))[:, None]
        # One adaLN input per token: the time is per patch, the condition per token.
        y_BPW = F.silu(t_emb_B1W + self.cond_proj(cond_BPD))
        x_BPW = self.input_proj(x_t_BPC)
        blocks_per_set = max(1, cfg.depth // cfg.num_adaln_sets)
        for i, block in enumerate(self.blocks):
            if i % blocks_per_set == 0:
                mod_BP6W = self.adaln_sets[i // blocks_per_set](y_BPW)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x_BPW = checkpoint(block, x_BPW, mod_BP6W, use_reentrant=False)
            else:
                x_BPW = block(x_BPW, mod_BP6W)
        scale, shift = self.final_adaln(y_BPW).chunk(2, dim=-1)
        out_BPC = self.final_proj(_modulate(self.final_norm(x_BPW), scale, shift))
        return 2 * torch.sigmoid(out_BPC) - 1


# Released `DiffHead` state-dict keys (relative to its `net.` module) -> ours. Shapes are equal;
# both MLP kinds land on mlp_in / mlp_out, whose shapes follow model.head.mlp.
HEAD_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"time_embed\.mlp\.0\.(weight|bias)", r"time_mlp_in.\1"),
    (r"time_embed\.mlp\.2\.(weight|bias)", r"time_mlp_out.\1"),
    (r"cond_embed\.(weight|bias)", r"cond_proj.\1"),
    (r"input_proj\.(weight|bias)", r"input_proj.\1"),
    (r"res_blocks\.(\d+)\.norm1\.(weight|bias)", r"blocks.\1.attn_norm.\2"),
    (r"res_blocks\.(\d+)\.attn\.wqkv\.(weight|bias)", r"blocks.\1.qkv.\2"),
    (r"res_blocks\.(\d+)\.attn\.wo\.(weight|bias)", r"blocks.\1.attn_out.\2"),
    (r"res_blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.mlp_norm.\2"),
    (r"res_blocks\.(\d+)\.(?:w1|mlp\.0)\.(weight|bias)", r"blocks.\1.mlp_in.\2"),
    (r"res_blocks\.(\d+)\.(?:w2|mlp\.2)\.(weight|bias)", r"blocks.\1.mlp_out.\2"),
    (r"ada_ln_blocks\.(\d+)\.(weight|bias)", r"adaln_sets.\1.\2"),
    (r"final_layer\.ada_ln_modulation\.(weight|bias)", r"final_adaln.\1"),
    (r"final_layer\.linear\.(weight|bias)", r"final_proj.\1"),
)


def _mlp_kind(key: str) -> str | None:
    """The MLP kind a released block key belongs to; None for keys outside the MLP."""
    m = re.fullmatch(r"res_blocks\.\d+\.(.+)\.(?:weight|bias)", key)
    return next((kind for kind, names in MLP_KINDS.items() if m and m.group(1) in names), None)


def head_key_from_bitdance(key: str, mlp: str | None = None) -> str:
    """Map one released head key (without the `net.` prefix) to ours; ValueError if unknown or,
    given our `mlp` kind, if the key belongs to the other kind's MLP."""
    kind = _mlp_kind(key)
    if mlp is not None and kind is not None and kind != mlp:
        raise ValueError(f"BitDance head key {key!r} belongs to a {kind} MLP (use_swiglu="
                         f"{kind == 'swiglu'}), but model.head.mlp is {mlp!r}")
    for pattern, repl in HEAD_KEY_MAP:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    raise ValueError(f"unknown BitDance diffusion-head key {key!r}")


def head_state_dict_from_bitdance(state_dict: dict[str, Tensor], prefix: str = "net.",
                                  mlp: str | None = None) -> dict[str, Tensor]:
    """Rename a released head state dict (keys `<prefix><key>`) to `DiffusionHead` keys.

    Keys without the prefix are ignored, so a whole MLLModel state dict can be passed with
    prefix "vision_diffusion_head.net.". `mlp` (our head's kind) refuses the other kind's keys.
    """
    return {head_key_from_bitdance(k[len(prefix):], mlp): v
            for k, v in state_dict.items() if k.startswith(prefix)}


# DiffHead's constructor defaults (flow_head_parallel_x.py), for arguments a config leaves out.
_DIFFHEAD_DEFAULTS = dict(grad_checkpointing=False, time_shift=1.0, time_schedule="logit_normal",
                          P_mean=0.0, P_std=1.0, parallel_num=4, diff_batch_mul=1,
                          use_swiglu=False)
_DIFFHEAD_REQUIRED = ("ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln")
_DIFFHEAD_TYPES = dict(ch_target=int, ch_cond=int, ch_latent=int, depth_latent=int,
                       depth_adanln=int, parallel_num=int, diff_batch_mul=int, time_shift=float,
                       P_mean=float, P_std=float, grad_checkpointing=bool, use_swiglu=bool,
                       time_schedule=str)


def _wrongly_typed(args: Mapping[str, Any]) -> list[str]:
    """JSON gives any type: 128.9 would truncate to 128 and "false" would be true."""
    def fits(value: Any, kind: type) -> bool:
        if kind is bool or isinstance(value, bool):
            return kind is bool and isinstance(value, bool)
        return isinstance(value, (int, float) if kind is float else kind)
    return [f"{k}={v!r} (expected {_DIFFHEAD_TYPES[k].__name__})" for k, v in args.items()
            if not fits(v, _DIFFHEAD_TYPES[k])]


def head_config_from_bitdance(kwargs: Mapping[str, Any]) -> HeadConfig:
    """Our config for a released `DiffHead(**kwargs)` (its vision_head_config.json).

    The release fixes what we configure: n_heads = W // 128 (head_dim = W // n_heads), MLP
    hidden int(1.5 W), 256 timestep features. `diff_batch_mul` becomes `repeat`, which the
    release applies in MLLModel before the head (DiffHead.forward itself scores each row once).
    """
    missing = [k for k in _DIFFHEAD_REQUIRED if k not in kwargs]
    unknown = sorted(set(kwargs) - set(_DIFFHEAD_REQUIRED) - set(_DIFFHEAD_DEFAULTS))
    if missing or unknown:
        raise ValueError(f"DiffHead arguments: missing {missing}, unknown {unknown}")
    a = {**_DIFFHEAD_DEFAULTS, **kwargs}
    wrong = _wrongly_typed(a)
    if wrong:
        raise ValueError(f"DiffHead arguments of the wrong type: {', '.join(wrong)}")
    width = a["ch_latent"]
    n_heads = width // 128
    if n_heads < 1 or width % n_heads:
        raise ValueError(f"DiffHead ch_latent {width}: the release splits it into ch_latent // 128 "
                         f"= {n_heads} attention heads, which needs >= 1 head dividing it")
    cfg = HeadConfig(
        width=width, depth=a["depth_latent"], num_adaln_sets=a["depth_adanln"],
        head_dim=width // n_heads, mlp_ratio=1.5, mlp="swiglu" if a["use_swiglu"] else "plain",
        bits=a["ch_target"], cond_dim=a["ch_cond"], tokens=a["parallel_num"],
        time_freq_dim=256, time_schedule=a["time_schedule"], p_mean=float(a["P_mean"]),
        p_std=float(a["P_std"]), time_shift=float(a["time_shift"]), repeat=a["diff_batch_mul"])
    cfg.validate()
    return cfg
