"""SSIM/PSNR against scikit-image, LPIPS loading from local files, discriminator pieces."""

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bdt.tokenizer.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss
from bdt.tokenizer.image_metrics import psnr, ssim
from bdt.tokenizer.lpips import LPIPS


def test_ssim_and_psnr_match_scikit_image():
    img = skdata.astronaut()[::4, ::4].astype(np.float64) / 255  # 128 x 128 x 3 real photo
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 0.05, img.shape), 0, 1)
    ref = structural_similarity(img, noisy, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1.0)
    t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() * 2 - 1  # noqa: E731
    assert ssim(t(noisy), t(img)).item() == pytest.approx(ref, abs=1e-4)
    assert psnr(t(noisy), t(img)).item() == pytest.approx(
        peak_signal_noise_ratio(img, noisy, data_range=1.0), abs=1e-3)
    assert ssim(t(img), t(img)).item() == pytest.approx(1.0, abs=1e-6)


def _write_lpips_weights(tmp_path, bad_lin=False):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = LPIPS()
    backbone = {f"features.{k}": v.clone() for k, v in ref.features.state_dict().items()}
    backbone["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision extras are ignored
    head = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    if bad_lin:
        head["lin2.model.1.weight"] = torch.rand(1, 255, 1, 1)
    save_file(backbone, str(tmp_path / "vgg16.safetensors"))
    torch.save(head, tmp_path / "lpips_vgg.pth")
    return str(tmp_path / "vgg16.safetensors"), str(tmp_path / "lpips_vgg.pth")


def test_lpips_from_local_files(tmp_path):
    backbone, head = _write_lpips_weights(tmp_path)
    model = LPIPS.from_local(backbone, head)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = x + 0.3 * torch.randn_like(x)
    assert torch.allclose(model(x, x), torch.zeros(2), atol=1e-6)
    assert (model(x, y) > 0).all()
    with pytest.raises(ValueError, match="loss.lpips_backbone"):
        LPIPS.from_local("", head)
    with pytest.raises(ValueError, match="not found"):
        LPIPS.from_local(str(tmp_path / "missing.pth"), head)
    _, bad = _write_lpips_weights(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path, bad_lin=True)
    with pytest.raises(ValueError, match=r"lin2.model.1.weight: expected \[1, 256, 1, 1\] got \[1, 255, 1, 1\]"):
        LPIPS.from_local(backbone, bad)
    # NaN weights once gave a NaN distance; a list instead of a state dict, an AttributeError
    nan = torch.load(head, weights_only=True)
    nan["lin0.model.1.weight"][0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"nan.pth: .*NaN or inf values \[lin0.model.1.weight\]"):
        LPIPS.from_local(backbone, str(tmp_path / "nan.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth: expected a mapping"):
        LPIPS.from_local(backbone, str(tmp_path / "list.pth"))


def test_adaptive_weight_equals_parameter_gradient_ratio():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    out = conv(x)
    target = torch.randn_like(out)
    rec = (out - target).abs().mean()
    g = -PatchDiscriminator(3, 8, 1)(out).mean()
    w = adaptive_weight(rec, g, conv, x, out)
    gr = torch.autograd.grad(rec, conv.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, conv.weight, retain_graph=True)[0].norm()
    assert w.item() == pytest.approx((gr / (gg + 1e-4)).item(), rel=1e-4)
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0


def test_loss_networks_live_on_the_engines_device(tmp_path):
    """On a GPU the images and reconstructions are on the device: a discriminator, its LeCam
    state or LPIPS left on the CPU failed the first step there. meta stands in for the GPU."""
    from bdt.config import load
    from bdt.training.tokenizer.config import TokenizerTrainConfig
    from bdt.training.tokenizer.loop import loss_networks

    backbone, head = _write_lpips_weights(tmp_path)
    cfg = load(TokenizerTrainConfig, [], ["run_dir=x", "data.shards=x", "loss.disc_weight=0.1",
                                          "loss.lpips_weight=1", f"loss.lpips_backbone={backbone}",
                                          f"loss.lpips_head={head}"])
    disc, lpips = loss_networks(cfg, 3, torch.device("meta"))
    tensors = [*disc.net.parameters(), *disc.lecam.buffers(), *lpips.parameters(),
               *lpips.buffers()]
    assert len(tensors) > 10 and all(t.is_meta for t in tensors)
    logits = torch.zeros(2, 1, 4, 4, device="meta")
    assert disc.lecam(logits, logits).is_meta  # its EMAs update in place on the device
    assert loss_networks(load(TokenizerTrainConfig, [], ["run_dir=x", "data.shards=x"]), 3,
                         torch.device("meta")) == (None, None)
