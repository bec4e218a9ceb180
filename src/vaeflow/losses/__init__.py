"""Losses as modules (taming/LDM style): each takes tensors, returns a scalar."""

from vaeflow.losses.adversarial import AdversarialLoss, adaptive_weight, hinge_d_loss, r1_penalty
from vaeflow.losses.kl import KLLoss, total_correlation
from vaeflow.losses.lecam import LeCAM
from vaeflow.losses.perceptual import PerceptualLoss, PerceptualWeightsMissing, lpips_weights_path
from vaeflow.losses.recon import ReconstructionLoss

__all__ = [
    "AdversarialLoss",
    "KLLoss",
    "LeCAM",
    "PerceptualLoss",
    "PerceptualWeightsMissing",
    "ReconstructionLoss",
    "adaptive_weight",
    "hinge_d_loss",
    "lpips_weights_path",
    "r1_penalty",
    "total_correlation",
]
