"""The non-finite guard: skip a bad optimizer step, roll back after several, stop after that.

Policy (`training.nonfinite` in the config):
- a step whose loss (generator or discriminator, any micro-batch of the accumulation
  window) or whose gradients are not finite is skipped: no optimizer, EMA, GradScaler,
  LeCAM or discriminator update; its gradients are dropped and it is not counted as an
  optimizer step (global_step does not advance);
- after `max_consecutive` skips in a row the stage rolls back to its last resume
  checkpoint (running/last.pt) and multiplies every learning rate by `lr_backoff`;
- after `max_rollbacks` rollbacks, the next rollback stops the stage with NonFiniteError.

With fp16 and a GradScaler, inf/NaN *gradients* belong to the scaler: it skips that step
and lowers its scale, as designed, and the guard does not count it. Only a non-finite
*loss* (which no loss scale causes) counts as a fault there. Without a scaler (fp32,
bf16) non-finite gradients count too.

One device sync per optimizer step (the finite flag is read on the host). Under data
parallelism the flag is all-reduced, so every rank takes the same decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vaeflow import collectives


class NonFiniteError(RuntimeError):
    """The stage kept producing non-finite steps after every allowed rollback."""


@dataclass(frozen=True)
class Policy:
    max_consecutive: int = 3
    lr_backoff: float = 0.5
    max_rollbacks: int = 3

    @classmethod
    def from_config(cls, training: dict) -> Policy:
        return cls(**(training.get("nonfinite") or {}))


def _all_finite(tensors, device: torch.device) -> torch.Tensor:
    """One 0-d bool tensor on `device`: every element of every tensor is finite (no sync)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=device)
    by_device: dict[torch.device, list] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    flags = []
    for group in by_device.values():
        # A norm is inf/NaN iff an element is (or the sum of squares overflows: as bad).
        norms = torch._foreach_norm([t.detach().float() if t.dtype not in (torch.float32, torch.float64) else t.detach() for t in group])
        flags.append(torch.isfinite(torch.stack(norms)).all().to(device))
    return torch.stack(flags).all()


class StepGuard:
    """Decides whether a step may go ahead, and what follows a skip. The counts live in the
    `TrainState` (skipped, consecutive_skips, rollbacks), so checkpoints carry them."""

    def __init__(self, policy: Policy, scaler_enabled: bool = False):
        self.policy = policy
        self.scaler_enabled = scaler_enabled
        self._loss_ok: torch.Tensor | None = None

    # ---------------------------------------------------------------- within a window
    def observe(self, *losses: torch.Tensor | None) -> None:
        """Remember whether these losses are finite, without waiting for the device."""
        for loss in losses:
            if loss is None:
                continue
            ok = torch.isfinite(loss.detach()).all()
            self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok.to(self._loss_ok.device)

    def check(self, params, device: torch.device, dist=None) -> str | None:
        """At the optimizer step, after gradients are averaged: None if the step may go ahead,
        else the reason ("loss", "gradients"). Resets the window. Same answer on every rank."""
        loss_ok = self._loss_ok if self._loss_ok is not None else torch.ones((), dtype=torch.bool, device=device)
        self._loss_ok = None
        if self.scaler_enabled:  # the GradScaler owns inf gradients (see the module docstring)
            grads_ok = torch.ones((), dtype=torch.bool, device=device)
        else:
            grads_ok = _all_finite([p.grad for p in params], device)
        bad = torch.stack([~loss_ok.to(device), ~grads_ok]).to(torch.float32)
        if dist is not None and dist.enabled:
            collectives.all_reduce(bad)  # summed: non-zero when any rank saw a non-finite value
        bad_loss, bad_grads = (bad > 0).tolist()  # the one sync per step
        if bad_loss:
            return "loss"
        return "gradients" if bad_grads else None

    # ---------------------------------------------------------------- after the decision
    @staticmethod
    def passed(state) -> None:
        state.consecutive_skips = 0

    @staticmethod
    def skip(state) -> None:
        state.consecutive_skips += 1
        state.skipped += 1

    def wants_rollback(self, state) -> bool:
        return state.consecutive_skips >= self.policy.max_consecutive

    def can_roll_back(self, state) -> bool:
        return state.rollbacks < self.policy.max_rollbacks

    def rolled_back(self, state, before, checkpoint_rollbacks: int) -> float:
        """`state` was just restored from a checkpoint taken after `checkpoint_rollbacks`
        rollbacks; `before` is the state the rollback left. Carries the counts over, counts
        this rollback and returns the factor for the restored learning rates (one backoff
        per rollback since that checkpoint)."""
        state.skipped = before.skipped
        state.rollbacks = before.rollbacks + 1
        state.consecutive_skips = 0
        return self.policy.lr_backoff ** (state.rollbacks - checkpoint_rollbacks)


def scale_learning_rates(optimizers, schedulers, factor: float) -> None:
    """Multiply the current and base learning rates of optimizers and their schedulers."""
    for opt in filter(None, optimizers):
        for group in opt.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
    for sch in filter(None, schedulers):
        if hasattr(sch, "base_lrs"):
            sch.base_lrs = [lr * factor for lr in sch.base_lrs]
        if hasattr(sch, "_last_lr"):
            sch._last_lr = [lr * factor for lr in sch._last_lr]
        if isinstance(getattr(sch, "eta_min", None), (int, float)):
            sch.eta_min *= factor
        if isinstance(getattr(sch, "min_lrs", None), list):
            sch.min_lrs = [lr * factor for lr in sch.min_lrs]


def all_finite(modules) -> bool:
    """Parameters and buffers of these modules are all finite (one sync)."""
    tensors = [t for m in filter(None, modules) for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    if not tensors:
        return True
    return bool(_all_finite(tensors, tensors[0].device))
