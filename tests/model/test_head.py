"""Diffusion head vs the BitDance fixture (tests/fixtures/bitdance/head_tiny), both MLP kinds,
shapes, init, mapping. The head's configuration comes from the fixture's constructor_args."""

import json
import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from bdt.model.head import (MLP_KINDS, DiffusionHead, HeadConfig, head_config_from_bitdance,
                            head_key_from_bitdance, head_state_dict_from_bitdance,
                            timestep_embedding)
from bdt.model.keymap import bitdance_head_keys

from reference import REF, fixture_params, load_fixture

META, TENSORS = load_fixture("head_tiny")
RELEASED = {k[len("net."):]: v for k, v in fixture_params(TENSORS).items()}  # DiffHead.net keys


def fixture_config(**changes) -> HeadConfig:
    """The fixture head's config. repeat = 1: DiffHead.forward scores each row once (MLLModel
    does the diff_batch_mul repeats before calling it)."""
    return replace(head_config_from_bitdance(META["constructor_args"]), repeat=1, **changes)


def load_head(released: dict[str, torch.Tensor], cfg: HeadConfig) -> DiffusionHead:
    head = DiffusionHead(cfg)
    head.load_state_dict(head_state_dict_from_bitdance(released, prefix="", mlp=cfg.mlp),
                         strict=True)
    return head.eval()


def load_fixture_head() -> tuple[DiffusionHead, dict[str, torch.Tensor]]:
    """The fixture's head (fp16-stored weights used as fp32) and its tensors."""
    return load_head(RELEASED, fixture_config()), TENSORS


def release_forward(p: dict[str, torch.Tensor], x_BPC, t_B, c_BPD) -> torch.Tensor:
    """Test oracle: the released TransEncoder.forward written out in its own key names, from
    the facts in head_tiny.json (n_head = W // 128, adaLN set switch every depth // sets
    blocks, scale/shift/gate order, q scaled before q k^T, timestep features cos first) and
    the MLP kind read off the keys (w1/w2 SwiGLU, mlp.0/mlp.2 Linear -> SiLU -> Linear)."""
    def lin(name, h):
        return F.linear(h, p[f"{name}.weight"], p[f"{name}.bias"])

    def norm(h, name=None):
        w, b = (p[f"{name}.weight"], p[f"{name}.bias"]) if name else (None, None)
        return F.layer_norm(h, h.shape[-1:], w, b, eps=1e-6)

    W = p["input_proj.weight"].shape[0]
    depth = len({k.split(".")[1] for k in p if k.startswith("res_blocks.")})
    sets = len({k.split(".")[1] for k in p if k.startswith("ada_ln_blocks.")})
    n_head = W // 128
    half = p["time_embed.mlp.0.weight"].shape[1] // 2
    args = 1000 * t_B[:, None] * torch.exp(-math.log(10000) * torch.arange(half) / half)
    t_emb = lin("time_embed.mlp.2", F.silu(lin("time_embed.mlp.0",
                                               torch.cat([args.cos(), args.sin()], -1))))
    y = F.silu(t_emb[:, None] + lin("cond_embed", c_BPD))
    h = lin("input_proj", x_BPC)
    B, P, _ = h.shape
    for i in range(depth):
        s1, b1, g1, s2, b2, g2 = lin(f"ada_ln_blocks.{i // max(1, depth // sets)}", y).chunk(6, -1)
        blk = f"res_blocks.{i}"
        q, k, v = (z.view(B, P, n_head, W // n_head).transpose(1, 2) for z in
                   lin(f"{blk}.attn.wqkv", norm(h, f"{blk}.norm1") * (1 + s1) + b1).chunk(3, -1))
        attn = torch.softmax((q * (W // n_head) ** -0.5) @ k.transpose(-1, -2), dim=-1)
        h = h + lin(f"{blk}.attn.wo", (attn @ v).transpose(1, 2).reshape(B, P, W)) * g1
        a = norm(h, f"{blk}.norm2") * (1 + s2) + b2
        if f"{blk}.w1.weight" in p:
            gate, up = lin(f"{blk}.w1", a).chunk(2, -1)
            a = lin(f"{blk}.w2", F.silu(gate) * up)
        else:
            a = lin(f"{blk}.mlp.2", F.silu(lin(f"{blk}.mlp.0", a)))
        h = h + a * g2
    scale, shift = lin("final_layer.ada_ln_modulation", y).chunk(2, -1)
    return 2 * torch.sigmoid(lin("final_layer.linear", norm(h) * (1 + scale) + shift)) - 1


def fixture_kind() -> str:
    return "swiglu" if META["constructor_args"].get("use_swiglu", False) else "plain"


def released_with_mlp(kind: str) -> dict[str, torch.Tensor]:
    """The fixture's weights with every block's MLP of `kind`: the fixture's own when it has
    that kind, else seeded random weights in the released shapes of that kind (hidden H from
    the fixture's derived mlp_hidden; swiglu w1 [2H, W], w2 [W, H]; plain mlp.0 [H, W],
    mlp.2 [W, H]; all with biases)."""
    if kind == fixture_kind():
        return dict(RELEASED)
    W, H = META["constructor_args"]["ch_latent"], META["derived"]["mlp_hidden"]
    shapes = {"swiglu": ((2 * H, W), (W, H)), "plain": ((H, W), (W, H))}[kind]
    gen = torch.Generator().manual_seed(5)
    out = {k: v for k, v in RELEASED.items() if not _is_mlp(k)}
    for i in range(META["constructor_args"]["depth_latent"]):
        for name, (rows, cols) in zip(MLP_KINDS[kind], shapes):
            out[f"res_blocks.{i}.{name}.weight"] = torch.randn(rows, cols, generator=gen) / cols ** 0.5
            out[f"res_blocks.{i}.{name}.bias"] = 0.1 * torch.randn(rows, generator=gen)
    return out


def _is_mlp(key: str) -> bool:
    """A block MLP key of either kind (res_blocks.N.{w1,w2,mlp.0,mlp.2}.*)."""
    m = re.fullmatch(r"res_blocks\.\d+\.(.+)\.(weight|bias)", key)
    return bool(m) and any(m.group(1) in names for names in MLP_KINDS.values())


def test_x_prediction_matches_fixture():
    head, data = load_fixture_head()
    with torch.no_grad():
        x_pred = head(data["io.x_t"], data["io.t"], data["io.cond"])
    torch.testing.assert_close(x_pred, data["io.x_pred"], atol=1e-5, rtol=1e-5)


def test_config_derivation_matches_fixture():
    """What the release derives from its arguments (heads, MLP width, parameter count)."""
    cfg, derived = fixture_config(), META["derived"]
    assert (cfg.width // cfg.head_dim, cfg.head_dim) == (derived["n_head"], derived["head_dim"])
    assert int(cfg.mlp_ratio * cfg.width) == derived["mlp_hidden"]
    assert max(1, cfg.depth // cfg.num_adaln_sets) == derived["ada_ln_switch_freq"]
    assert sum(p.numel() for p in DiffusionHead(cfg).parameters()) == META["weights"]["num_params"]


@pytest.mark.parametrize("kind", list(MLP_KINDS))
def test_oracle_reproduces_fixture_and_both_mlp_kinds_match_it(kind):
    """The oracle reproduces the fixture's x-prediction (its own MLP kind); our head with either
    MLP kind, loaded through the key map, then equals the oracle on the same weights."""
    x, t, c = TENSORS["io.x_t"], TENSORS["io.t"], TENSORS["io.cond"]
    with torch.no_grad():
        torch.testing.assert_close(release_forward(RELEASED, x, t, c), TENSORS["io.x_pred"],
                                   atol=1e-5, rtol=1e-5)
        released = released_with_mlp(kind)
        head = load_head(released, fixture_config(mlp=kind))
        ours, want = head(x, t, c), release_forward(released, x, t, c)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, TENSORS["io.x_pred"], atol=1e-3) or kind == fixture_kind()


@pytest.mark.parametrize("kind", list(MLP_KINDS))
def test_released_keys_and_shapes_round_trip_for_both_mlp_kinds(kind):
    released = {k: tuple(v.shape) for k, v in released_with_mlp(kind).items()}
    cfg = fixture_config(mlp=kind)
    ours = {k: tuple(v.shape) for k, v in DiffusionHead(cfg).state_dict().items()}
    assert sorted(bitdance_head_keys(cfg)) == sorted(released)  # export names = the release's
    assert {head_key_from_bitdance(k, kind): s for k, s in released.items()} == ours
    H, W = META["derived"]["mlp_hidden"], cfg.width
    per_block = {"swiglu": W * 2 * H + 2 * H + H * W + W, "plain": W * H + H + H * W + W}[kind]
    assert sum(math.prod(s) for k, s in released.items() if _is_mlp(k)) == cfg.depth * per_block
    other = next(k for k in MLP_KINDS if k != kind)
    with pytest.raises(ValueError, match=rf"belongs to a {kind} MLP .* model.head.mlp is '{other}'"):
        head_state_dict_from_bitdance(released_with_mlp(kind), prefix="", mlp=other)


def test_plain_block_by_hand():
    """One plain block with the attention gate zeroed: x + gate2 * (W2 silu(W1 m + b1) + b2),
    m = LN(x) (1 + scale2) + shift2, computed element by element."""
    torch.manual_seed(0)
    block = DiffusionHead(HeadConfig(width=8, depth=1, num_adaln_sets=1, head_dim=8, bits=2,
                                     cond_dim=2, mlp="plain", mlp_ratio=1.5)).blocks[0]
    assert block.mlp_in.weight.shape == (12, 8) and block.mlp_out.weight.shape == (8, 12)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 1, 8)
    scale2, shift2, gate2 = torch.randn(3, 8).unbind()
    mod = torch.cat([torch.zeros(8), torch.zeros(8), torch.zeros(8), scale2, shift2, gate2])
    ln_w, ln_b = block.mlp_norm.weight, block.mlp_norm.bias
    block.requires_grad_(False)
    xs = x[0, 0].tolist()
    mean = sum(xs) / 8
    std = math.sqrt(sum((v - mean) ** 2 for v in xs) / 8 + 1e-6)
    m = [((xs[j] - mean) / std * ln_w[j] + ln_b[j]) * (1 + scale2[j]) + shift2[j] for j in range(8)]
    hid = [sum(block.mlp_in.weight[i, j] * m[j] for j in range(8)) + block.mlp_in.bias[i]
           for i in range(12)]
    hid = [v / (1 + math.exp(-v)) for v in hid]
    want = [xs[o] + gate2[o] * (sum(block.mlp_out.weight[o, i] * hid[i] for i in range(12))
                                + block.mlp_out.bias[o]) for o in range(8)]
    with torch.no_grad():
        got = block(x, mod.view(1, 1, 48))
    torch.testing.assert_close(got[0, 0], torch.tensor([float(v) for v in want]),
                               atol=1e-5, rtol=1e-5)


def test_head_config_from_bitdance_arguments():
    args = META["constructor_args"]
    assert fixture_config(mlp="plain").mlp == "plain"
    assert head_config_from_bitdance({**args, "use_swiglu": False}).mlp == "plain"
    minimal = {k: args[k] for k in ("ch_target", "ch_cond", "ch_latent", "depth_latent",
                                    "depth_adanln")}
    defaults = head_config_from_bitdance(minimal)  # DiffHead's own defaults fill the rest
    assert (defaults.mlp, defaults.p_mean, defaults.p_std, defaults.tokens) == ("plain", 0.0, 1.0, 4)
    assert head_config_from_bitdance({**minimal, "ch_latent": 320}).head_dim == 160  # 2 heads
    with pytest.raises(ValueError, match=r"missing \['ch_latent'\], unknown \['use_swigl'\]"):
        head_config_from_bitdance({**{k: v for k, v in minimal.items() if k != "ch_latent"},
                                   "use_swigl": True})
    with pytest.raises(ValueError, match="ch_latent 64: .* 0 attention heads"):
        head_config_from_bitdance({**minimal, "ch_latent": 64})
    # JSON of the wrong type is named, never coerced (int(128.9) == 128, bool("false") is True).
    assert head_config_from_bitdance({**minimal, "P_std": 1}).p_std == 1.0  # an int is a float
    for key, value in (("ch_latent", 128.9), ("depth_latent", "2"), ("use_swiglu", "false"),
                       ("parallel_num", True), ("P_mean", None), ("time_schedule", 1)):
        with pytest.raises(ValueError, match=f"wrong type: {key}={value!r}"):
            head_config_from_bitdance({**minimal, key: value})


def test_timestep_embedding_matches_fixture():
    want = TENSORS["io.t_freq_embedding"]
    # The arguments 1000*t*freq reach 950, where one float32 ulp is 6.1e-5: sin/cos kernels of
    # different CPUs (SLEEF avx2 vs avx512) differ by up to that, so 1e-5 is below what float32
    # can promise here (measured 3.0e-5 on 2 of 768 values on an AMD EPYC). A wrong order (sin
    # first) or wrong frequencies miss by O(1).
    torch.testing.assert_close(timestep_embedding(TENSORS["io.t"], want.shape[-1]), want,
                               atol=1e-4, rtol=0)


def test_key_mapping_covers_the_14b_head_one_to_one():
    ref = json.loads((REF / "mllm_keys_14b.json").read_text())
    prefix = "vision_diffusion_head.net."
    released = {k[len(prefix):]: tuple(v) for k, v in ref["state_dict_16x"].items()
                if k.startswith(prefix)}
    cfg = head_config_from_bitdance(ref["head_constructor_args_16x"])
    with torch.device("meta"):
        head = DiffusionHead(cfg)
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    mapped = {head_key_from_bitdance(k, cfg.mlp): shape for k, shape in released.items()}
    assert mapped == ours
    assert sorted(bitdance_head_keys(cfg)) == sorted(released)


def test_unknown_bitdance_key_is_an_error():
    with pytest.raises(ValueError, match="res_blocks.0.attn.q_norm"):
        head_key_from_bitdance("res_blocks.0.attn.q_norm.weight")


@pytest.mark.parametrize("P", [1, 4, 16, 64])
@pytest.mark.parametrize("mlp", list(MLP_KINDS))
def test_any_patch_size_forward_backward(P, mlp):
    cfg = HeadConfig(width=64, depth=2, num_adaln_sets=1, head_dim=32, bits=6, cond_dim=24,
                     tokens=P, mlp=mlp)
    head = DiffusionHead(cfg)
    torch.nn.init.normal_(head.final_proj.weight, std=0.02)
    x_pred = head(torch.randn(3, P, 6), torch.rand(3), torch.randn(3, P, 24))
    assert x_pred.shape == (3, P, 6)
    assert x_pred.abs().max() < 1  # squashed by 2*sigmoid-1
    x_pred.sum().backward()
    assert head.input_proj.weight.grad is not None


def test_zero_initialised_output():
    torch.manual_seed(0)
    head = DiffusionHead(HeadConfig(width=64, depth=2, num_adaln_sets=2, head_dim=32, bits=8,
                                    cond_dim=16, tokens=4))
    x_pred = head(torch.randn(2, 4, 8), torch.rand(2), torch.randn(2, 4, 16))
    assert torch.equal(x_pred, torch.zeros_like(x_pred))
    (x_pred - torch.ones_like(x_pred)).square().sum().backward()
    assert head.final_proj.bias.grad.abs().sum() > 0  # zero-init layers still learn


def test_tokens_of_a_patch_attend_to_each_other_bidirectionally():
    torch.manual_seed(0)
    head = DiffusionHead(HeadConfig(width=64, depth=1, num_adaln_sets=1, head_dim=32, bits=4,
                                    cond_dim=8, tokens=4))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, c = torch.randn(1, 4, 4), torch.rand(1), torch.randn(1, 4, 8)
    x2 = x.clone()
    x2[0, 3] += 1.0  # change only the LAST token
    with torch.no_grad():
        assert not torch.allclose(head(x, t, c)[0, 0], head(x2, t, c)[0, 0])


@pytest.mark.parametrize("depth, sets, want", [(4, 2, [0, 1]), (2, 3, [0, 1])])
def test_adaln_sets_are_shared_by_consecutive_blocks(depth, sets, want):
    """Set i serves blocks [i*depth/sets, (i+1)*depth/sets); with fewer blocks than sets (the
    release allows it) block i uses set i and the rest stay unused."""
    torch.manual_seed(0)
    head = DiffusionHead(HeadConfig(width=64, depth=depth, num_adaln_sets=sets, head_dim=32,
                                    bits=4, cond_dim=8, tokens=2))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    used = []
    hooks = [s.register_forward_hook(lambda m, i, o, k=k: used.append(k))
             for k, s in enumerate(head.adaln_sets)]
    head(torch.randn(1, 2, 4), torch.rand(1), torch.randn(1, 2, 8))
    for h in hooks:
        h.remove()
    assert used == want


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = HeadConfig(width=64, depth=2, num_adaln_sets=2, head_dim=32, bits=4, cond_dim=8,
                     tokens=4)
    heads = [DiffusionHead(cfg), DiffusionHead(cfg, activation_checkpointing=True)]
    heads[1].load_state_dict(heads[0].state_dict())
    inputs = (torch.randn(2, 4, 4), torch.rand(2), torch.randn(2, 4, 8))
    grads = []
    for head in heads:
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(p.numel()))
        head(*inputs).square().sum().backward()
        grads.append(head.blocks[0].qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_config_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="model.head.depth"):
        DiffusionHead(HeadConfig(width=64, depth=3, num_adaln_sets=2, head_dim=32))
    with pytest.raises(ValueError, match="model.head.width"):
        DiffusionHead(HeadConfig(width=100, head_dim=32))
    with pytest.raises(ValueError, match="model.head.mlp must be one of swiglu, plain, got 'geglu'"):
        HeadConfig(mlp="geglu").validate()
    with pytest.raises(ValueError, match="model.head.time_schedule must be one of"):
        HeadConfig(time_schedule="cosine").validate()
    head = DiffusionHead(HeadConfig(width=64, depth=1, num_adaln_sets=1, head_dim=32, bits=4,
                                    cond_dim=8, tokens=4))
    with pytest.raises(ValueError, match=r"x_t \[B,P,4\]"):
        head(torch.randn(1, 4, 5), torch.rand(1), torch.randn(1, 4, 8))
