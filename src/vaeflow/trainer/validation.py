"""End-of-epoch checks on the evaluation weights (EMA when enabled): the validation
losses, and grids of fixed validation images and fixed prior samples."""

from __future__ import annotations

import torch
from torch import nn

from vaeflow import checkpoint as ckpt
from vaeflow.layout import StageLayout
from vaeflow.grid import save_image
from vaeflow.metrics import to_model_range, to_unit
from vaeflow.trainer.console import Meter
from vaeflow.trainer.objective import Objective

N_FIXED_SAMPLES = 20  # the same validation images in every grid


class _EvalMode:
    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        # per module: a frozen part stays in eval mode after validation (build.apply_modes)
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, training in self.modes:
            m.training = training


@torch.no_grad()
def validate(model: nn.Module, val_data, objective: Objective, batch_size: int, device: torch.device) -> dict:
    """Validation losses, means over images."""
    meter = Meter()
    n = len(val_data)
    order = torch.arange(n)
    with _EvalMode(model):
        for start in range(0, n, batch_size):
            x = to_model_range(val_data.fetch(order[start : start + batch_size]), model).to(device)
            meter.add_images(objective.validation(model, x), x.shape[0])
    return meter.means()


def prior_noise(model: nn.Module, n: int, seed: int) -> torch.Tensor:
    """Fixed latent samples for the generation grids."""
    return model.sample_prior(n, generator=torch.Generator().manual_seed(seed + 7919)).cpu()


@torch.no_grad()
def save_grids(model: nn.Module, fixed_val: torch.Tensor, fixed_noise: torch.Tensor, device: torch.device,
               layout: StageLayout, tag: str) -> dict:
    """The validation images (original), their reconstructions (nr_o) and prior samples (gen),
    written as PNGs and returned (name -> [N, C, H, W] tiles in [0, 1])."""
    with _EvalMode(model):
        x = to_model_range(fixed_val, model).to(device)
        recon = to_unit(model.ae_forward(x, sample_posterior=False).recon.float(), model).cpu()
        gen = to_unit(model.decode_latent(fixed_noise.to(device)).float(), model).cpu()
    originals = fixed_val
    if fixed_val.ndim == 5:  # volumes: show the middle slice of each
        mid = fixed_val.shape[2] // 2
        originals, recon, gen = fixed_val[:, :, mid], recon[:, :, mid], gen[:, :, mid]
    grids = {"original": originals, "nr_o": recon, "gen": gen}
    for name, imgs in grids.items():
        out = layout.train_grid(tag, name)
        out.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write(out, lambda f, imgs=imgs: save_image(imgs, f, nrow=5))
    return grids
