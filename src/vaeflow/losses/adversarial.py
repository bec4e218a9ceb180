"""PatchGAN hinge loss, R1 penalty and taming's adaptive generator weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaeflow import collectives


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma/2 * E ||grad_x D(x)||^2 on real images, in fp32 whatever the autocast state."""
    device_type = real.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        x = real.detach().float().requires_grad_(True)
        logits = discriminator(x)
        (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return 0.5 * gamma * grad.pow(2).flatten(1).sum(1).mean()


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """||d nll / d last|| / ||d g_loss / d last||, clamped (taming-transformers VQGAN).

    With several processes both gradients are averaged over the ranks first (one
    all-reduce), so the weight is the one of the whole global batch, as in one process.
    """
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if collectives.active():
        both = torch.stack([nll_grad, g_grad])
        collectives.all_reduce(both)
        nll_grad, g_grad = both / collectives.world()
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class AdversarialLoss(nn.Module):
    """Generator and discriminator sides of the hinge GAN, gated by disc_start."""

    def __init__(self, lambda_adv=0.5, disc_start=0, r1_gamma=0.0, adaptive=True, max_weight=1e4):
        super().__init__()
        self.lambda_adv, self.disc_start, self.r1_gamma = lambda_adv, disc_start, r1_gamma
        self.adaptive, self.max_weight = adaptive, max_weight

    def active(self, step: int) -> bool:
        return step >= self.disc_start

    def generator(self, discriminator, recon, nll=None, last_layer=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (weighted loss, raw g loss, weight)."""
        g = hinge_g_loss(discriminator(recon))
        if self.adaptive and nll is not None and last_layer is not None and nll.requires_grad:
            w = adaptive_weight(nll, g, last_layer, self.max_weight)
        else:
            w = torch.ones((), device=g.device)
        return self.lambda_adv * w * g, g.detach(), w

    def discriminator(self, discriminator, real, fake) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss incl. R1, hinge part)."""
        d = hinge_d_loss(discriminator(real.detach()), discriminator(fake.detach()))
        loss = d
        if self.r1_gamma > 0:
            loss = loss + r1_penalty(discriminator, real, self.r1_gamma)
        return loss, d.detach()
