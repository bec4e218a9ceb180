"""Optimizers and schedulers from a stage's `optimization` section (torch class names)."""

from __future__ import annotations

import torch

OPTIMIZERS = {
    "AdamW": torch.optim.AdamW,
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "RMSprop": torch.optim.RMSprop,
}
SCHEDULERS = ("CosineAnnealingLR", "StepLR", "ExponentialLR", "ReduceLROnPlateau")


def build_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer type {kind!r} not supported (use {', '.join(OPTIMIZERS)})")
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    return OPTIMIZERS[kind](params, **cfg)


def build_scheduler(optimizer, cfg: dict | None, total_epochs: int):
    """Schedulers step once per epoch; ReduceLROnPlateau steps on the validation loss."""
    if not cfg:
        return None
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if kind == "CosineAnnealingLR":
        base = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, total_epochs), eta_min=base * cfg.get("eta_min_factor", 0.0)
        )
    if kind == "StepLR":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.get("step_size", 10), gamma=cfg.get("gamma", 0.1))
    if kind == "ExponentialLR":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.get("gamma", 0.95))
    if kind == "ReduceLROnPlateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=cfg.get("mode", "min"), factor=cfg.get("factor", 0.1), patience=cfg.get("patience", 10)
        )
    raise ValueError(f"scheduler type {kind!r} not supported (use {', '.join(SCHEDULERS)})")
