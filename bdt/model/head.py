"""The binary diffusion head (method §3): denoises the P tokens of one patch jointly.

Per patch row b the head gets the noisy bits x_t [P, C], the flow time t (one per patch) and one
condition vector per token (LLM hidden state + 2D position embedding, [P, D]). It is a small
transformer over the P tokens: pre-LayerNorm blocks modulated by adaLN (scale, shift, gate)
computed from SiLU(time_emb + cond_emb), bidirectional attention among the P tokens, a SwiGLU MLP
of hidden 1.5*W, and a zero-initialised final adaLN + Linear(W -> C). The output is an
x-prediction squashed to (-1, 1) by 2*sigmoid - 1 (the data are +-1 bits).

The adaLN projections are shared: `num_adaln_sets` Linear(W -> 6W) for `depth` blocks, block i
using set i // (depth / num_adaln_sets) (BitDance shares them between consecutive blocks to save
parameters; with W = 5120 one set is 157M parameters).

Parameter names are ours; `head_key_from_bitdance` / `head_state_dict_from_bitdance` map the
released checkpoint's `DiffHead` keys (`net.*`, see tests/fixtures/bitdance/head_tiny.json and the
`vision_diffusion_head.net.*` keys of mllm_keys_14b.json) onto them, shapes unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class HeadConfig:
    """Diffusion head hyperparameters; defaults are BitDance-14B's head (16 tokens per step)."""

    width: int = 5120  # W, the head's channel width
    depth: int = 6  # transformer blocks
    num_adaln_sets: int = 2  # shared adaLN projections; depth must be a multiple
    head_dim: int = 128  # attention head size (BitDance: n_heads = W // 128)
    mlp_ratio: float = 1.5  # SwiGLU hidden = int(mlp_ratio * W)
    bits: int = 32  # C, bits per image token (ae_d16c32)
    cond_dim: int = 5120  # D, the condition width (the LLM hidden size)
    tokens: int = 16  # P, tokens per patch (= per AR step); the network itself takes any P
    time_freq_dim: int = 256  # sinusoidal timestep features fed to the time MLP
    # Training-time flow time t = sigmoid(N(p_mean, p_std^2)), then shifted (method §3).
    p_mean: float = -0.8
    p_std: float = 0.8
    time_shift: float = 1.0
    # "diff_batch_mul": score each clean patch this many times with fresh (t, noise) per step.
    repeat: int = 1

    def validate(self) -> None:
        """Raise ValueError naming the first bad key (as `model.head.<key>`)."""
        for key in ("width", "depth", "num_adaln_sets", "head_dim", "bits", "cond_dim", "tokens",
                    "time_freq_dim", "repeat"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.head.{key} must be >= 1, got {getattr(self, key)}")
        if self.width % self.head_dim:
            raise ValueError(f"model.head.width ({self.width}) must be a multiple of "
                             f"model.head.head_dim ({self.head_dim})")
        if self.depth % self.num_adaln_sets:
            raise ValueError(f"model.head.depth ({self.depth}) must be a multiple of "
                             f"model.head.num_adaln_sets ({self.num_adaln_sets})")
        if self.time_freq_dim % 2:
            raise ValueError(f"model.head.time_freq_dim must be even, got {self.time_freq_dim}")
        if self.p_std <= 0 or self.time_shift <= 0 or self.mlp_ratio <= 0:
            raise ValueError("model.head.p_std, time_shift and mlp_ratio must be > 0, got "
                             f"{self.p_std}, {self.time_shift}, {self.mlp_ratio}")


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

    def __init__(self, width: int, head_dim: int, mlp_hidden: int):
        super().__init__()
        self.head_dim = head_dim
        self.attn_norm = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp_in = nn.Linear(width, 2 * mlp_hidden)  # [gate | up], gate first
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
        gate, up = self.mlp_in(_modulate(self.mlp_norm(x_BPW), scale2, shift2)).chunk(2, dim=-1)
        return x_BPW + gate2 * self.mlp_out(F.silu(gate) * up)


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
            HeadBlock(W, cfg.head_dim, int(cfg.mlp_ratio * W)) for _ in range(cfg.depth))
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
        blocks_per_set = cfg.depth // cfg.num_adaln_sets
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


# Released `DiffHead` state-dict keys (relative to its `net.` module) -> ours. Shapes are equal.
HEAD_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"time_embed\.mlp\.0\.(weight|bias)", r"time_mlp_in.\1"),
    (r"time_embed\.mlp\.2\.(weight|bias)", r"time_mlp_out.\1"),
    (r"cond_embed\.(weight|bias)", r"cond_proj.\1"),
    (r"input_proj\.(weight|bias)", r"input_proj.\1"),
    (r"res_blocks\.(\d+)\.norm1\.(weight|bias)", r"blocks.\1.attn_norm.\2"),
    (r"res_blocks\.(\d+)\.attn\.wqkv\.(weight|bias)", r"blocks.\1.qkv.\2"),
    (r"res_blocks\.(\d+)\.attn\.wo\.(weight|bias)", r"blocks.\1.attn_out.\2"),
    (r"res_blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.mlp_norm.\2"),
    (r"res_blocks\.(\d+)\.w1\.(weight|bias)", r"blocks.\1.mlp_in.\2"),
    (r"res_blocks\.(\d+)\.w2\.(weight|bias)", r"blocks.\1.mlp_out.\2"),
    (r"ada_ln_blocks\.(\d+)\.(weight|bias)", r"adaln_sets.\1.\2"),
    (r"final_layer\.ada_ln_modulation\.(weight|bias)", r"final_adaln.\1"),
    (r"final_layer\.linear\.(weight|bias)", r"final_proj.\1"),
)


def head_key_from_bitdance(key: str) -> str:
    """Map one released head key (without the `net.` prefix) to ours; ValueError if unknown."""
    for pattern, repl in HEAD_KEY_MAP:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    raise ValueError(f"unknown BitDance diffusion-head key {key!r}")


def head_state_dict_from_bitdance(state_dict: dict[str, Tensor],
                                  prefix: str = "net.") -> dict[str, Tensor]:
    """Rename a released head state dict (keys `<prefix><key>`) to `DiffusionHead` keys.

    Keys without the prefix are ignored, so a whole MLLModel state dict can be passed with
    prefix "vision_diffusion_head.net.".
    """
    return {head_key_from_bitdance(k[len(prefix):]): v
            for k, v in state_dict.items() if k.startswith(prefix)}
