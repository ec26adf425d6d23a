"""Exponential moving average of a module's parameters, kept in fp32 on every rank.

Needs full parameters on each rank (ZeRO 0-2). The decay ramps up as (1 + t) / (10 + t) until it
reaches `decay`, so short runs are not dominated by the random initialisation.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bdt.weights import state_dict_problems


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in module.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1 - d)

    @contextlib.contextmanager
    def swapped_in(self, module: nn.Module):
        """The averaged weights in `module` for the duration (sampling, export), then the live
        ones back, bit for bit."""
        live = {}
        with torch.no_grad():
            for name, p in module.named_parameters():
                live[name] = p.detach().clone()
                p.copy_(self.shadow[name])
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.copy_(live[name])

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """ValueError naming what does not fit (nothing loaded): averaged parameters missing,
        unknown, mis-shaped or NaN/inf, as from a checkpoint of another model or a damaged one
        (an export of them would look fine and draw garbage)."""
        shadow = state.get("shadow") if isinstance(state, dict) else None
        if not isinstance(shadow, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in shadow.items()):
            raise ValueError("EMA state: expected {'shadow': {parameter name: tensor}, 'updates': n}")
        problems = state_dict_problems(self.shadow, shadow)
        if problems:
            raise ValueError("EMA state does not fit the model (a checkpoint of another model, or "
                             "damaged): " + "; ".join(problems))
        for name, t in shadow.items():
            self.shadow[name].copy_(t)
        self.updates = int(state.get("updates", 0))

    def module_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """`module.state_dict()` with the averaged parameters in place of the live ones."""
        out = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
        out.update({k: v.clone() for k, v in self.shadow.items()})
        return out
