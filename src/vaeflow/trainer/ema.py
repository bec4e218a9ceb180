"""Exponential moving average of the autoencoder's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Shadow copy updated after every optimizer step.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) (LDM's LitEma), so a
    short stage is not dominated by its initial weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._listed = None  # (model, shadow params, its params, shadow buffers, its buffers)

    def _tensors(self, model: nn.Module) -> tuple:
        # Listed on the first update (the model is on its device by then): walking the module
        # tree at every step cost about 4 % of a default-config step.
        if self._listed is None or self._listed[0] is not model:
            self._listed = (model, list(self.model.parameters()), list(model.parameters()),
                            list(self.model.buffers()), list(model.buffers()))
        return self._listed[1:]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_params, params, ema_buffers, buffers = self._tensors(model)
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for b_ema, b in zip(ema_buffers, buffers):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"weights": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.num_updates = int(state["num_updates"])
