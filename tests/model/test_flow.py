"""Flow loss, time grid and Euler-Maruyama sampler vs the BitDance fixture (head_tiny); seeds,
guidance scales and step counts come from the fixture's description of each call."""

import re
from dataclasses import replace

import pytest
import torch

from bdt.model.flow import (binarize, bit_accuracy, cfg_schedule, flow_loss, sample,
                            shift_time, time_grid, velocity)
from bdt.model.head import DiffusionHead, HeadConfig

from reference import call_value, seed_of
from test_head import META, load_fixture_head

SAMPLER = META["sampler"]
GRIDS_KEY = next(k for k in SAMPLER if k.startswith("time_grid_N"))
GRID_STEPS = int(re.match(r"time_grid_N(\d+)", GRIDS_KEY).group(1))


def test_seeded_loss_matches_fixture():
    head, data = load_fixture_head()
    torch.manual_seed(seed_of(META["loss"]["call"]))  # t is drawn first, then the noise
    loss_BP = flow_loss(head, data["loss.x0_bits"], data["loss.cond"])
    torch.testing.assert_close(loss_BP, data["loss.loss"], atol=1e-5, rtol=1e-5)
    loss_BP.mean().backward()
    assert head.final_proj.weight.grad.abs().sum() > 0


def test_uniform_time_schedule_draws_like_the_release():
    """time_schedule 'uniform' (the release's other schedule): t = U[0,1) is the first draw,
    then shifted, then the noise; the loss is the fixture's formula on those draws."""
    head, data = load_fixture_head()
    head.cfg = replace(head.cfg, time_schedule="uniform", time_shift=3.0)
    x, cond = data["loss.x0_bits"], data["loss.cond"]
    loss_BP = flow_loss(head, x, cond, torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    t = shift_time(torch.rand(x.shape[0], generator=gen), 3.0)[:, None, None]
    z = (1 - t) * torch.randn(x.shape, generator=gen) + t * x
    with torch.no_grad():
        want = (velocity(x, z, t) - velocity(head(z, t.view(-1), cond), z, t)).square().mean(-1)
    torch.testing.assert_close(loss_BP.detach(), want, atol=1e-6, rtol=1e-6)


def test_sampler_matches_fixture_without_and_with_cfg():
    head, data = load_fixture_head()
    plain, guided = SAMPLER["sample.out_cfg1"], SAMPLER["sample.out_cfgN"]
    torch.manual_seed(seed_of(plain))
    x = sample(head, data["sample.cond_cfg1"], None, cfg_scale=call_value(plain, "cfg"),
               num_steps=int(call_value(plain, "num_sampling_steps")))
    torch.testing.assert_close(x, data["sample.out_cfg1"], atol=1e-4, rtol=0)
    cond = data["sample.cond_cfgN"]  # [cond rows; uncond rows]
    B = cond.shape[0] // 2
    scale, steps = call_value(guided, "cfg"), int(call_value(guided, "num_sampling_steps"))
    gen = torch.Generator().manual_seed(seed_of(guided))  # draws like the seeded global RNG
    x = sample(head, cond[:B], cond[B:], cfg_scale=scale, num_steps=steps, generator=gen)
    torch.testing.assert_close(x, data["sample.out_cfgN"][:B], atol=1e-4, rtol=0)
    # A per-call schedule of the same constant is the same sampler.
    gen = torch.Generator().manual_seed(seed_of(guided))
    x2 = sample(head, cond[:B], cond[B:], cfg_scale=cfg_schedule(scale, steps + 1),
                num_steps=steps, generator=gen)
    torch.testing.assert_close(x2, x, atol=0, rtol=0)


@pytest.mark.parametrize("shift", sorted(SAMPLER[GRIDS_KEY]))
def test_time_grid_matches_fixture_bit_for_bit(shift):
    ref = SAMPLER[GRIDS_KEY][shift]
    t_used = next(v for k, v in ref.items() if k.startswith("t_used_at_step_i"))
    t, dt = time_grid(GRID_STEPS, float(shift))
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
