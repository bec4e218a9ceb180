"""Rebuild a trained autoencoder from a vaeflow checkpoint (for evaluation and sampling)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from vaeflow import checkpoint as ckpt


def load_autoencoder(path: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
    """Returns (model in eval mode, checkpoint dict). EMA weights when present and asked for."""
    from vaeflow.models import build_model

    state = ckpt.load_vaeflow(path)
    with warnings.catch_warnings():  # the "starts from scratch" warning: weights load next
        warnings.simplefilter("ignore")
        model = build_model(state["config"]["model"])
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    return model.to(device).eval(), state


def load_exported(folder: str | Path, device: str | torch.device = "cpu"):
    """A `vaeflow export` folder in the vaeflow format (config.json + weights.safetensors,
    docs/export.md) -> (model in eval mode, its config.json as a dict). Needs no training config:
    the folder describes itself."""
    import json

    from vaeflow.models import build_model
    from vaeflow.models.pretrained import NATIVE_FORMAT, load_into

    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text())
    if meta.get("format") != NATIVE_FORMAT:
        raise ValueError(f"{folder}: config.json has format {meta.get('format')!r}, expected {NATIVE_FORMAT!r} "
                         "(a diffusers folder loads with diffusers' from_pretrained)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(meta["model"])
    load_into(model, str(folder))
    return model.to(device).eval(), meta
