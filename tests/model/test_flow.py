"""Flow loss, time grid and Euler-Maruyama sampler vs the BitDance fixture (head_tiny)."""

import json

import pytest
import torch

from bdt.model.flow import (binarize, bit_accuracy, cfg_schedule, flow_loss, sample,
                            time_grid)
from bdt.model.head import DiffusionHead, HeadConfig

from reference import REF
from test_head import load_fixture_head


def test_seeded_loss_matches_fixture():
    head, data = load_fixture_head()
    torch.manual_seed(79)  # the fixture's seed; t is drawn first, then the noise
    loss_BP = flow_loss(head, data["loss.x0_bits"], data["loss.cond"])
    torch.testing.assert_close(loss_BP, data["loss.loss"], atol=1e-5, rtol=1e-5)
    loss_BP.mean().backward()
    assert head.final_proj.weight.grad.abs().sum() > 0


def test_sampler_matches_fixture_without_and_with_cfg():
    head, data = load_fixture_head()
    torch.manual_seed(80)
    x = sample(head, data["sample.cond_cfg1"], None, cfg_scale=1.0, num_steps=10)
    torch.testing.assert_close(x, data["sample.out_cfg1"], atol=1e-4, rtol=0)
    cond = data["sample.cond_cfgN"]  # [cond rows; uncond rows]
    B = cond.shape[0] // 2
    gen = torch.Generator().manual_seed(81)  # a generator draws like the seeded global RNG
    x = sample(head, cond[:B], cond[B:], cfg_scale=4.0, num_steps=10, generator=gen)
    torch.testing.assert_close(x, data["sample.out_cfgN"][:B], atol=1e-4, rtol=0)
    # A per-call schedule of the same constant is the same sampler.
    gen = torch.Generator().manual_seed(81)
    x2 = sample(head, cond[:B], cond[B:], cfg_scale=cfg_schedule(4.0, 11), num_steps=10,
                generator=gen)
    torch.testing.assert_close(x2, x, atol=0, rtol=0)


@pytest.mark.parametrize("shift", ["0.5", "1.0", "3.0"])
def test_time_grid_matches_fixture_bit_for_bit(shift):
    grids = json.loads((REF / "head_tiny.json").read_text())["sampler"]["time_grid_N10_by_shift"]
    ref = grids[shift]
    t_used = next(v for k, v in ref.items() if k.startswith("t_used_at_step_i"))
    t, dt = time_grid(10, float(shift))
    assert t.tolist() == torch.tensor(t_used).tolist()
    assert dt.tolist() == torch.tensor(ref["dt"]).tolist()


def tiny_head(repeat: int = 1) -> DiffusionHead:
    torch.manual_seed(0)
    head = DiffusionHead(HeadConfig(width=64, depth=2, num_adaln_sets=1, head_dim=32, bits=8,
                                    cond_dim=16, tokens=4, repeat=repeat, time_shift=2.0))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return head


def test_repeat_scores_each_patch_with_fresh_noise_and_averages():
    x = torch.randn(3, 4, 8).sign()
    cond = torch.randn(3, 4, 16)
    loss_r = flow_loss(tiny_head(repeat=2), x, cond, torch.Generator().manual_seed(5))
    # Same draws as one pass over the batch stacked twice.
    loss_1 = flow_loss(tiny_head(), x.repeat(2, 1, 1), cond.repeat(2, 1, 1),
                       torch.Generator().manual_seed(5))
    assert loss_r.shape == (3, 4)
    torch.testing.assert_close(loss_r, (loss_1[:3] + loss_1[3:]) / 2)
    assert not torch.allclose(loss_1[:3], loss_1[3:])  # fresh (t, noise) per copy


def test_cfg_schedule_and_sampler_argument_errors():
    assert cfg_schedule(3.0, 4) == [3.0] * 4
    assert cfg_schedule(3.0, 4, "linear") == [1.5, 2.0, 2.5, 3.0]
    with pytest.raises(ValueError, match="'cosine'"):
        cfg_schedule(3.0, 4, "cosine")
    head = tiny_head()
    cond = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="uncond_BPD"):
        sample(head, cond, None, cfg_scale=2.0, num_steps=3)
    with pytest.raises(ValueError, match="num_steps \\+ 1 = 4"):
        sample(head, cond, cond, cfg_scale=[2.0] * 3, num_steps=3)


def test_guidance_scale_changes_the_sample_and_unit_scale_ignores_uncond():
    head = tiny_head()
    cond, uncond = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    run = lambda u, s: sample(head, cond, u, s, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(run(uncond, 1.0), run(None, 1.0), atol=1e-5, rtol=0)
    assert not torch.allclose(run(uncond, 3.0), run(None, 1.0), atol=1e-3)


def test_binarize_never_emits_zero_and_bit_accuracy():
    x = torch.tensor([[-0.3, 0.0, 2.0, -0.0]])
    assert binarize(x).tolist() == [[-1.0, 1.0, 1.0, 1.0]]
    target = torch.tensor([[-1.0, -1.0, 1.0, 1.0]])
    assert bit_accuracy(x, target).item() == 0.75


def test_head_trained_with_the_loss_samples_back_its_bits():
    """Loss and sampler agree: a head fitted to 6 (condition -> bit patch) pairs samples them."""
    torch.manual_seed(0)
    head = DiffusionHead(HeadConfig(width=64, depth=2, num_adaln_sets=1, head_dim=32, bits=8,
                                    cond_dim=16, tokens=4, repeat=4))
    x, cond = torch.randn(6, 4, 8).sign(), torch.randn(6, 4, 16)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        loss = flow_loss(head, x, cond, gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    bits = binarize(sample(head, cond, None, 1.0, 10, generator=torch.Generator().manual_seed(2)))
    assert (bits == x).float().mean() >= 0.99
