"""The tokenizer's patch discriminator as the trainer drives it (method §1.1: the adversarial
loss of the tokenizer's lineage): the network, its optimizer and schedule, and the LeCam state.

A plain torch AdamW, with gradients all-reduced by hand, not a second DeepSpeed engine: the
discriminator is small and replicated (ZeRO buys nothing there); a second engine would add a
second ZeRO state and checkpoint tree, and the generator step backpropagates through the
discriminator (whose grads must not be applied), a pattern engines with gradient hooks handle
poorly. Its state goes into the checkpoint's shared file (loop.py).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from bdt.tokenizer.discriminator import LeCam, PatchDiscriminator, hinge_d_loss
from bdt.training.deepspeed_config import make_schedule
from bdt.training.divergence import plain_grad_norm
from bdt.training.schedule import ConfigLR, WarmupSchedule
from bdt.training.tokenizer.config import TokenizerTrainConfig


def lr_schedule(cfg: TokenizerTrainConfig) -> WarmupSchedule:
    """The run's learning-rate schedule: the autoencoder's engine and the discriminator
    follow the same one."""
    return make_schedule(cfg.optim, cfg.schedule_steps or cfg.steps)


class Discriminator:
    """Plain-torch discriminator, its optimizer/schedule and LeCam state, replicated on all ranks."""

    def __init__(self, cfg: TokenizerTrainConfig, in_channels: int,
                 device: torch.device | str = "cpu"):
        """`device`: the autoencoder's, where the images and reconstructions it judges are
        (initialised on the CPU, then moved: the same weights on every device)."""
        torch.manual_seed(cfg.seed + 1)  # identical init on every rank
        self.net = PatchDiscriminator(in_channels, cfg.loss.disc_width,
                                      cfg.loss.disc_layers).to(device)
        self.cfg = cfg
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.loss.disc_lr, betas=(0.5, 0.9))
        self.sched = ConfigLR(self.opt, lr_schedule(cfg))
        self.lecam = LeCam().to(device)

    def step(self, real: torch.Tensor, fake: torch.Tensor, lecam_weight: float, scale: float) -> dict:
        real_logits, fake_logits = self.net(real), self.net(fake)
        loss = hinge_d_loss(real_logits, fake_logits)
        if lecam_weight > 0:
            loss = loss + lecam_weight * self.lecam(real_logits, fake_logits)
        (loss * scale).backward()
        return {"d_loss": loss.item(), "d_real": real_logits.mean().item(), "d_fake": fake_logits.mean().item()}

    def apply(self, world_size: int, clip: float) -> float:
        """Step on the averaged gradients; returns their norm (before clipping), for the
        divergence check: the discriminator is in the checkpoint too."""
        if world_size > 1:  # average gradients by hand (no engine here, see the module docstring)
            for p in self.net.parameters():
                if p.grad is not None:
                    tdist.all_reduce(p.grad)
                    p.grad /= world_size
        norm = plain_grad_norm(self.net)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        return norm

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "lecam": self.lecam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.net.load_state_dict(state["net"])
        except RuntimeError as e:  # a size mismatch: the config changed, not the checkpoint
            first = str(e).splitlines()[1].strip()
            raise ValueError(f"loss.disc_width / loss.disc_layers ({self.cfg.loss.disc_width} / "
                             f"{self.cfg.loss.disc_layers}) do not fit the checkpoint's "
                             f"discriminator: resume with the values it was trained with "
                             f"({first})") from None
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])  # after the optimizer: the config's LR wins
        self.lecam.load_state_dict(state["lecam"])
