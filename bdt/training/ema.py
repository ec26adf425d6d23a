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
        # A tied parameter (an LLM's lm_head.weight is its embed_tokens.weight) is averaged once,
        # under the name named_parameters() lists; its other names map to that one.
        self.shadow: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, str] = {}
        first: dict[int, str] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) in first:
                self.aliases[name] = first[id(p)]
            else:
                first[id(p)] = name
                self.shadow[name] = p.detach().float().clone()

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

    def averaged(self) -> dict[str, torch.Tensor]:
        """The averages under every name of every parameter (a tied one's names share a tensor):
        a reader overlaying them on `module.state_dict()` replaces each copy, not one."""
        return {**self.shadow, **{a: self.shadow[c] for a, c in self.aliases.items()}}

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.averaged()}

    def load_state_dict(self, state: dict) -> None:
        """ValueError naming what does not fit (nothing loaded): averaged parameters missing,
        unknown, mis-shaped or NaN/inf, as from a checkpoint of another model or a damaged one
        (an export of them would look fine and draw garbage)."""
        shadow = state.get("shadow") if isinstance(state, dict) else None
        if not isinstance(shadow, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in shadow.items()):
            raise ValueError("EMA state: expected {'shadow': {parameter name: tensor}, 'updates': n}")
        # A tied parameter's other names (absent from checkpoints written before they were
        # listed) hold the same tensor: the parameter's own name is the one loaded.
        shadow = {k: v for k, v in shadow.items() if k not in self.aliases}
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
        out.update({k: v.clone() for k, v in self.averaged().items()})
        return out
