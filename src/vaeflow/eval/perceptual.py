"""LPIPS for evaluation: per-image scores through the same torchmetrics module the training
loss uses (`vaeflow.losses.perceptual`), on the evaluation device. Never a random backbone
unless `VAEFLOW_LPIPS_RANDOM_BACKBONE=1` (tests only), and then loudly and marked
`comparable: false`."""

from __future__ import annotations

from importlib.metadata import version

import torch


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
    """Wrap an LPIPS module ([B, 3, H, W] in [-1, 1] -> [B, 1, 1, 1]) as per-image scores of
    [0, 1] images, prepared by `losses.perceptual.lpips_inputs` exactly as the training loss
    prepares them; volumes are scored per slice and averaged."""
    from vaeflow.losses.perceptual import lpips_inputs

    def score(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        per = module(*lpips_inputs(rec, x, "unit")).flatten(1).mean(1).double()
        return per.view(x.shape[0], -1).mean(1) if x.dim() == 5 else per

    return score
