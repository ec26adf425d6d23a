"""LPIPS perceptual distance (Zhang et al. 2018, VGG variant) from locally provided weights.

No weights ship offline and nothing downloads: the VGG16 backbone comes from a torchvision
`vgg16` state dict (`features.<i>.weight|bias`; classifier keys are ignored) and the per-layer
linear heads from the LPIPS release's `vgg.pth` (`lin<k>.model.1.weight`, 1x1 convs [1, C, 1, 1]).
Both may be safetensors or torch files (read with weights_only=True).

Distance: scale inputs with the LPIPS shift/scale, take the VGG activations after relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3, unit-normalise each over channels, square the difference,
weight channels with the linear head, average spatially and sum over the five layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdt.tokenizer.io import read_state_dict
from bdt.weights import state_dict_problems

# VGG16 "D": conv widths and pooling ("M"); taps after these feature indices (ReLU outputs).
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(ch, v, 3, padding=1), nn.ReLU()]
                ch = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in _TAP_CHANNELS])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))

    @classmethod
    def from_local(cls, backbone_path: str, head_path: str) -> "LPIPS":
        """Load from local files; raises ValueError naming a missing file or key / bad shape."""
        if not backbone_path or not head_path:
            raise ValueError("loss.lpips_weight > 0 needs local weights: set loss.lpips_backbone (a "
                             "torchvision vgg16 state dict) and loss.lpips_head (LPIPS vgg.pth); none "
                             "ship offline and nothing is downloaded")
        model = cls()
        want = {"features": {f"features.{k}": v for k, v in model.features.state_dict().items()},
                "lins": {f"lin{k}.model.1.weight": lin for k, lin in enumerate(model.lins)}}
        for path, part in ((backbone_path, "features"), (head_path, "lins")):
            try:
                found = read_state_dict(path)  # names the file it cannot read; never unpickles
            except FileNotFoundError as exc:
                raise ValueError(f"LPIPS weights not found: {exc.filename or path}") from None
            expected = want[part]
            # torchvision's file also holds the classifier, which LPIPS does not use
            problems = state_dict_problems(expected, {k: v for k, v in found.items() if k in expected})
            if problems:
                raise ValueError(f"{path}: not LPIPS's {part} weights: " + "; ".join(problems))
            with torch.no_grad():
                for key, param in expected.items():
                    param.copy_(found[key])
        model.requires_grad_(False)
        return model.eval()

    def forward(self, x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
        """Per-image distance [B] for inputs in [-1, 1]."""
        h = torch.cat([x_BCHW, y_BCHW]).float()
        h = (h - self.shift) / self.scale
        total = 0.0
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == _TAPS[tap]:
                fx, fy = F.normalize(h, dim=1, eps=1e-10).chunk(2)
                total = total + ((fx - fy) ** 2 * self.lins[tap]).sum(1).mean((1, 2))
                tap += 1
                if tap == len(_TAPS):
                    break
        return total
