"""Pixel reconstruction losses: l1 | mse | bce | bce_focal, mean over elements."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReconstructionLoss(nn.Module):
    """Mean per-element reconstruction loss.

    `bce` and `bce_focal` take targets in [0, 1]; signed ([-1, 1]) tensors are mapped
    to [0, 1] first, and the reconstruction is treated as a probability (clamped), so
    they work for sigmoid-output models and for tanh/linear ones alike.
    """

    def __init__(self, kind: str = "mse", focal_gamma: float = 2.0, signed: bool = True):
        super().__init__()
        if kind not in {"l1", "mse", "bce", "bce_focal"}:
            raise ValueError(f"recon_type must be l1|mse|bce|bce_focal, got {kind!r}")
        self.kind, self.focal_gamma, self.signed = kind, focal_gamma, signed

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "l1":
            return (recon - target).abs().mean()
        if self.kind == "mse":
            return F.mse_loss(recon, target)
        if self.signed:  # map [-1, 1] -> [0, 1]
            recon, target = (recon + 1) / 2, (target + 1) / 2
        p = recon.float().clamp(1e-6, 1 - 1e-6)
        t = target.float()
        bce = -(t * p.log() + (1 - t) * (1 - p).log())
        if self.kind == "bce":
            return bce.mean()
        # Focal BCE: down-weight well-predicted pixels by (1 - p_t)^gamma.
        p_t = t * p + (1 - t) * (1 - p)
        return ((1 - p_t) ** self.focal_gamma * bce).mean()
