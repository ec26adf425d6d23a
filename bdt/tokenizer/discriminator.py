"""Patch discriminator and GAN losses for tokenizer training (method §1: the WeTok lineage uses a
patch discriminator with adversarial weight ~0.1 and LeCam regularisation 0.05).

A PatchGAN-style stack of 4x4 convolutions (stride 2, then 1) with GroupNorm instead of
BatchNorm, so the statistics do not depend on the per-rank batch; it outputs one logit per patch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, width: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, num_layers + 1):
            out = width * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                       nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net(images_BCHW)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


class LeCam(nn.Module):
    """LeCam regulariser (Tseng et al. 2021): keeps D's outputs near EMAs of the opposite side.

    The EMAs track the mean logits over ALL ranks, so every rank holds the same buffers (the
    checkpoint stores rank 0's copy, and a resume must not change any rank's state).
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            means = torch.stack([real_logits.mean(), fake_logits.mean()]).float()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(means)
                means /= dist.get_world_size()
            self.ema_real.lerp_(means[0], 1 - self.decay)
            self.ema_fake.lerp_(means[1], 1 - self.decay)
        return (F.relu(real_logits - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - fake_logits).pow(2).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, layer: nn.Conv2d,
                    layer_input: torch.Tensor, layer_output: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """||d rec / d W_last|| / ||d g / d W_last|| (Esser et al. 2021, VQGAN): balances the
    adversarial gradient against the reconstruction gradient at the decoder's output conv.

    The weight gradients are rebuilt from the gradient at the conv's output and its input
    (`conv2d_weight`) instead of differentiating w.r.t. the parameter: DeepSpeed hooks every
    parameter's gradient and the model output, and an extra autograd pass through them runs its
    gradient-reduction epilogue. `layer_output` is the model's output (the decoder ends with this
    conv), possibly cast: a copy taken after the engine, so no DeepSpeed hook is reached.
    """
    def weight_grad(loss: torch.Tensor) -> torch.Tensor:
        g_out = torch.autograd.grad(loss, layer_output, retain_graph=True)[0]
        return torch.nn.grad.conv2d_weight(layer_input.detach().float(), layer.weight.shape, g_out.float(),
                                           stride=layer.stride, padding=layer.padding,
                                           dilation=layer.dilation, groups=layer.groups)

    weight = weight_grad(rec_loss).norm() / (weight_grad(g_loss).norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
