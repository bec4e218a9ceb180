"""KL regularisation: beta with linear warm-up or beta-VAE annealing, free bits, TC."""

from __future__ import annotations

import math

import torch
from torch import nn


def kl_elements(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


class KLLoss(nn.Module):
    """KL term in nats per image, with its weight schedule.

    - `beta(step)`: kl_beta ramped linearly over kl_warmup_steps, or, when beta_start
      is set, beta-VAE annealing from beta_start to beta_end over beta_steps.
    - free bits: each latent channel's batch-mean KL is floored at `free_bits` nats,
      so the optimiser gets no reward for pushing a channel below it.
    """

    def __init__(self, kl_beta=1e-6, warmup_steps=0, free_bits=0.0, beta_start=None, beta_end=None, beta_steps=0):
        super().__init__()
        self.kl_beta, self.warmup_steps, self.free_bits = kl_beta, warmup_steps, free_bits
        self.beta_start, self.beta_end, self.beta_steps = beta_start, beta_end, beta_steps

    def beta(self, step: int) -> float:
        if self.beta_start is not None:
            end = self.beta_end if self.beta_end is not None else self.kl_beta
            frac = 1.0 if self.beta_steps <= 0 else min(1.0, step / self.beta_steps)
            return self.beta_start + (end - self.beta_start) * frac
        if self.warmup_steps > 0:
            return self.kl_beta * min(1.0, step / self.warmup_steps)
        return self.kl_beta

    def forward(self, mean: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (kl for the loss, with free bits applied; raw kl for logging), both per image.

        fp32 whatever the autocast state: exp(logvar) and sums over many latents overflow
        or lose the small terms in fp16/bf16.
        """
        with torch.autocast(device_type=mean.device.type, enabled=False):
            return self._forward_fp32(mean.float(), logvar.float())

    def _forward_fp32(self, mean: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kl = kl_elements(mean, logvar)
        raw = kl.flatten(1).sum(1).mean()
        if self.free_bits <= 0:
            return raw, raw.detach()
        if kl.dim() > 2:  # [B, C, *spatial]: channel c's KL per image
            per_channel = kl.flatten(2).sum(2).mean(0)
        else:  # [B, D] vector latents: each dimension is a channel
            per_channel = kl.mean(0)
        return per_channel.clamp(min=self.free_bits).sum(), raw.detach()


def _log_normal(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mean).pow(2) / logvar.exp())


def total_correlation(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, dataset_size: int) -> torch.Tensor:
    """beta-TCVAE's total correlation with minibatch-weighted sampling (Chen et al. 2018).

    TC = E_q[log q(z) - sum_d log q(z_d)], with q(z) estimated over the minibatch as
    logsumexp_j log q(z_i | x_j) - log(B * N).
    """
    b = z.shape[0]
    z, mean, logvar = z.flatten(1).float(), mean.flatten(1).float(), logvar.flatten(1).float()
    mat = _log_normal(z[:, None, :], mean[None, :, :], logvar[None, :, :])  # [B, B, D]
    log_norm = math.log(b * dataset_size)
    log_qz = torch.logsumexp(mat.sum(2), dim=1) - log_norm
    log_prod_qzd = (torch.logsumexp(mat, dim=1) - log_norm).sum(1)
    return (log_qz - log_prod_qzd).mean()
