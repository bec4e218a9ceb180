"""LPIPS through the `lpips` package, refusing to run on a random backbone.

The package ships its linear heads; the AlexNet/VGG/SqueezeNet backbone comes from
torchvision's cache. Without that file, a stage that asks for LPIPS fails before
training starts and says where the file goes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MIN_SIZE = 64

BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class PerceptualWeightsMissing(RuntimeError):
    pass


def lpips_weights_path(net: str = "alex") -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def check_lpips_weights(net: str = "alex") -> Path:
    path = lpips_weights_path(net)
    if not path.is_file():
        raise PerceptualWeightsMissing(
            f"use_lpips needs the {net} backbone weights at {path} (torchvision's cache, "
            f"$TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}); copy "
            f"{BACKBONE_FILES[net]} there or run once with internet access. "
            "vaeflow never trains with a random LPIPS backbone."
        )
    return path


class PerceptualLoss(nn.Module):
    """Mean LPIPS distance; inputs in [-1, 1], grayscale repeated to 3 channels."""

    def __init__(self, net: str = "alex", pretrained_backbone: bool = True):
        super().__init__()
        import lpips  # imported here: only stages that use LPIPS pay for it

        if pretrained_backbone:
            check_lpips_weights(net)
        self.lpips = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False)
        self.lpips.eval().requires_grad_(False)

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """fp32 whatever the autocast state: LPIPS normalizes features channel-wise and sums
        small squared differences, which fp16/bf16 round away."""
        with torch.autocast(device_type=recon.device.type, enabled=False):
            return self._forward_fp32(recon.float(), target.float())

    def _forward_fp32(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if recon.dim() == 5:  # volumes: score every slice along depth
            recon = recon.transpose(1, 2).flatten(0, 1)
            target = target.transpose(1, 2).flatten(0, 1)
        if recon.shape[1] == 1:
            recon, target = recon.repeat(1, 3, 1, 1), target.repeat(1, 3, 1, 1)
        if min(recon.shape[-2:]) < MIN_SIZE:  # the backbones' pooling needs >= 64 px (digits are 8-32)
            size = [max(MIN_SIZE, s) for s in recon.shape[-2:]]
            recon = F.interpolate(recon, size=size, mode="bilinear", align_corners=False)
            target = F.interpolate(target, size=size, mode="bilinear", align_corners=False)
        return self.lpips(recon.float(), target.float()).mean()
