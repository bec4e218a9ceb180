"""LPIPS for evaluation: per-image scores through the same torchmetrics module the training
loss uses (`vaeflow.losses.perceptual`), on the evaluation device. Never a random backbone
unless `VAEFLOW_LPIPS_RANDOM_BACKBONE=1` (tests only), and then loudly and marked
`comparable: false`."""

from __future__ import annotations

from importlib.metadata import version

import torch
import torch.nn.functional as F


def lpips_scorer(net: str = "alex", device="cpu", log=print):
    """(score(rec, x) -> per-image LPIPS, info) or (None, info saying why not)."""
    from vaeflow.losses.perceptual import (RANDOM_BACKBONE_ENV, PerceptualLoss, PerceptualWeightsMissing,
                                           random_backbone_opt_in)

    random = random_backbone_opt_in()
    try:
        loss = PerceptualLoss(net, pretrained_backbone=not random)
    except PerceptualWeightsMissing as exc:
        return None, {"available": False, "net": net, "reason": str(exc)}
    except Exception as exc:  # torchmetrics missing or broken
        return None, {"available": False, "net": net, "reason": f"{type(exc).__name__}: {exc}"}
    if random:
        log(f"WARNING: {RANDOM_BACKBONE_ENV}=1: LPIPS uses a RANDOM {net} backbone (tests only); "
            "the number is marked NOT comparable")
    info = {"available": True, "net": net, "comparable": not random, "backbone": loss.backbone,
            "library": f"torchmetrics {version('torchmetrics')} LPIPS v0.1 (linear heads bundled with torchmetrics)"}
    return lpips_per_image(loss.lpips.to(device)), info


def lpips_per_image(module):
    """Wrap an LPIPS module (inputs in [-1, 1], [B, 3, H, W] -> [B, 1, 1, 1]) as per-image
    scores of [0, 1] images. Grayscale is repeated to RGB; images smaller than 32 pixels are
    upsampled (bilinear) to 64 so AlexNet/VGG feature maps stay non-empty; volumes are scored
    per slice and averaged."""

    def score(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if x.dim() == 5:
            d = x.shape[2]
            return score(rec.transpose(1, 2).flatten(0, 1), x.transpose(1, 2).flatten(0, 1)).view(b, d).mean(1)
        if x.shape[1] == 1:
            rec, x = rec.repeat(1, 3, 1, 1), x.repeat(1, 3, 1, 1)
        if min(x.shape[-2:]) < 32:
            rec = F.interpolate(rec, size=(64, 64), mode="bilinear", align_corners=False)
            x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        return module(rec.float() * 2 - 1, x.float() * 2 - 1).flatten(1).mean(1).double()

    return score
