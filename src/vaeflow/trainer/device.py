"""`device: auto` picks cuda, then mps, then cpu."""

from __future__ import annotations

import torch


def resolve_device(name: str | None, fallback: torch.device | None = None) -> torch.device:
    if name is None:
        return fallback if fallback is not None else resolve_device("auto")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"training.device is {name!r} but CUDA is not available on this machine")
    return dev
