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
