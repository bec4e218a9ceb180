"""Optimizers and schedulers from a stage's `optimization` section (torch class names)."""

from __future__ import annotations

import torch

from vaeflow.config import FUSED_OPTIMIZERS

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
    params = list(params)
    if kind in FUSED_OPTIMIZERS and "fused" not in cfg and "foreach" not in cfg and _fusable(params):
        # One kernel over all parameters instead of a Python loop over them (torch's default
        # on CPU): ~10 % of a default-config step. `fused: false` in the config (Adam, AdamW) turns it off.
        cfg["fused"] = True
    return OPTIMIZERS[kind](params, **cfg)


def _fusable(params: list) -> bool:
    """torch's fused Adam takes floating-point tensors on one CPU or CUDA device."""
    tensors = [p["params"] if isinstance(p, dict) else [p] for p in params]
    flat = [t for group in tensors for t in group]
    return bool(flat) and all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in flat) \
        and len({t.device for t in flat}) == 1


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
