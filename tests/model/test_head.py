"""Diffusion head vs the BitDance fixture (tests/fixtures/bitdance/head_tiny), shapes, init, mapping."""

import json

import pytest
import torch
from safetensors.torch import load_file

from bdt.model.head import (DiffusionHead, HeadConfig, head_key_from_bitdance,
                            head_state_dict_from_bitdance, timestep_embedding)

from reference import REF
TINY_HEAD = dict(width=256, depth=2, num_adaln_sets=2, bits=8, cond_dim=64, tokens=4)


def load_fixture_head() -> tuple[DiffusionHead, dict[str, torch.Tensor]]:
    """The fixture's head (fp16-stored weights used as fp32) and its tensors."""
    data = load_file(REF / "head_tiny.safetensors")
    head = DiffusionHead(HeadConfig(**TINY_HEAD))
    params = {k[len("param."):]: v.float() for k, v in data.items() if k.startswith("param.")}
    head.load_state_dict(head_state_dict_from_bitdance(params), strict=True)
    return head.eval(), data


def test_x_prediction_matches_fixture():
    head, data = load_fixture_head()
    with torch.no_grad():
        x_pred = head(data["io.x_t"], data["io.t"], data["io.cond"])
    torch.testing.assert_close(x_pred, data["io.x_pred"], atol=1e-5, rtol=1e-5)


def test_timestep_embedding_matches_fixture():
    data = load_file(REF / "head_tiny.safetensors")
    # The arguments 1000*t*freq reach 950, where one float32 ulp is 6.1e-5: sin/cos kernels of
    # different CPUs (SLEEF avx2 vs avx512) differ by up to that, so 1e-5 is below what float32
    # can promise here (measured 3.0e-5 on 2 of 768 values on an AMD EPYC). A wrong order (sin
    # first) or wrong frequencies miss by O(1).
    torch.testing.assert_close(timestep_embedding(data["io.t"], 256),
                               data["io.t_freq_embedding"], atol=1e-4, rtol=0)


def test_key_mapping_covers_the_14b_head_one_to_one():
    keys = json.loads((REF / "mllm_keys_14b.json").read_text())["state_dict_16x"]
    prefix = "vision_diffusion_head.net."
    released = {k[len(prefix):]: tuple(v) for k, v in keys.items() if k.startswith(prefix)}
    with torch.device("meta"):
        head = DiffusionHead(HeadConfig())  # the defaults are BitDance-14B's head
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    mapped = {head_key_from_bitdance(k): shape for k, shape in released.items()}
    assert mapped == ours


def test_unknown_bitdance_key_is_an_error():
    with pytest.raises(ValueError, match="res_blocks.0.attn.q_norm"):
        head_key_from_bitdance("res_blocks.0.attn.q_norm.weight")


@pytest.mark.parametrize("P", [1, 4, 16, 64])
def test_any_patch_size_forward_backward(P):
    cfg = HeadConfig(width=64, depth=2, num_adaln_sets=1, head_dim=32, bits=6, cond_dim=24,
                     tokens=P)
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


def test_adaln_sets_are_shared_by_consecutive_blocks():
    torch.manual_seed(0)
    head = DiffusionHead(HeadConfig(width=64, depth=4, num_adaln_sets=2, head_dim=32, bits=4,
                                    cond_dim=8, tokens=2))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    used = []
    hooks = [s.register_forward_hook(lambda m, i, o, k=k: used.append(k))
             for k, s in enumerate(head.adaln_sets)]
    head(torch.randn(1, 2, 4), torch.rand(1), torch.randn(1, 2, 8))
    for h in hooks:
        h.remove()
    assert used == [0, 1]  # set 0 for blocks 0-1, set 1 for blocks 2-3


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
    head = DiffusionHead(HeadConfig(width=64, depth=1, num_adaln_sets=1, head_dim=32, bits=4,
                                    cond_dim=8, tokens=4))
    with pytest.raises(ValueError, match=r"x_t \[B,P,4\]"):
        head(torch.randn(1, 4, 5), torch.rand(1), torch.randn(1, 4, 8))
