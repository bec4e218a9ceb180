"""PatchGAN hinge loss, R1 penalty, LeCAM and taming's adaptive generator weight.

Precision: the R1 penalty, the adaptive weight and LeCAM are computed in fp32 whatever
the autocast state (R1 and the weight differentiate twice or divide gradient norms,
where fp16/bf16 rounding and underflow bite); only D's forward passes for the hinge
loss follow the trainer's autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaeflow import collectives
from vaeflow.losses.lecam import LeCAM


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


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4,
                    scale=None) -> torch.Tensor:
    """||d nll / d last|| / ||d g_loss / d last||, clamped to [0, max_weight] (taming-transformers VQGAN).

    fp32: the gradients are taken with autocast off and their norms in fp32. `scale` (a
    GradScaler's `scale`) multiplies both losses first, so fp16 gradients of the unscaled
    losses cannot underflow to 0; the ratio is unchanged (the 1e-4 is scaled alike). A
    non-finite ratio (an fp16 overflow, which the GradScaler skips) gives weight 0, so
    the loss stays finite and the guard does not mistake the scaler's skip for a fault.
    With several processes both gradients are averaged over the ranks first (one
    all-reduce), so the weight is the one of the whole global batch, as in one process.
    """
    scale = scale or (lambda t: t)
    with torch.autocast(device_type=last_layer.device.type, enabled=False):
        nll_grad = torch.autograd.grad(scale(nll), last_layer, retain_graph=True)[0].float()
        g_grad = torch.autograd.grad(scale(g_loss), last_layer, retain_graph=True)[0].float()
        if collectives.active():  # the global batch's weight, as in one process
            both = torch.stack([nll_grad, g_grad])
            collectives.all_reduce(both)
            nll_grad, g_grad = both / collectives.world()
        eps = scale(torch.full((), 1e-4, device=g_grad.device))
        weight = nll_grad.norm() / (g_grad.norm() + eps)
        weight = torch.where(torch.isfinite(weight), weight, torch.zeros_like(weight))
    return weight.clamp(0.0, max_weight).detach()


class AdversarialLoss(nn.Module):
    """Generator and discriminator sides of the hinge GAN.

    The discriminator trains from step `disc_start`; the generator receives the
    adversarial loss from `gan_start` (default: disc_start). With gan_start > disc_start
    D warms up on the frozen-by-then reconstructions before it shapes G.
    """

    def __init__(self, lambda_adv=0.5, disc_start=0, r1_gamma=0.0, adaptive=True, max_weight=1e4,
                 gan_start=None, lambda_lecam=0.0, lecam: LeCAM | None = None):
        super().__init__()
        self.lambda_adv, self.disc_start, self.r1_gamma = lambda_adv, disc_start, r1_gamma
        self.gan_start = disc_start if gan_start is None else gan_start
        self.adaptive, self.max_weight = adaptive, max_weight
        self.lambda_lecam = lambda_lecam
        self.lecam = (lecam or LeCAM()) if lambda_lecam > 0 else None  # its averages: training state

    def active(self, step: int) -> bool:
        """The discriminator trains at this step."""
        return step >= self.disc_start

    def generator_active(self, step: int) -> bool:
        """The generator receives the adversarial loss at this step."""
        return step >= self.gan_start

    def generator(self, discriminator, recon, nll=None, last_layer=None, scale=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (weighted loss, raw g loss, weight). `scale`: see `adaptive_weight`."""
        g = hinge_g_loss(discriminator(recon))
        if self.adaptive and nll is not None and last_layer is not None and nll.requires_grad:
            w = adaptive_weight(nll, g, last_layer, self.max_weight, scale)
        else:
            w = torch.ones((), device=g.device)
        return self.lambda_adv * w * g, g.detach(), w

    def discriminator(self, discriminator, real, fake) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss incl. R1 and LeCAM, hinge part)."""
        logits_real, logits_fake = discriminator(real.detach()), discriminator(fake.detach())
        d = hinge_d_loss(logits_real, logits_fake)
        loss = d
        if self.r1_gamma > 0:
            loss = loss + r1_penalty(discriminator, real, self.r1_gamma)
        if self.lecam is not None:
            loss = loss + self.lambda_lecam * self.lecam(logits_real, logits_fake)
        return loss, d.detach()
