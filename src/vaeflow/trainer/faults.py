"""VAEFLOW_FAULT: a test hook that makes chosen optimizer steps fail, to exercise the guard.

    VAEFLOW_FAULT=nan@step:17                  the loss of optimizer step 17 is NaN
    VAEFLOW_FAULT=nan@step:5,6,7               several steps
    VAEFLOW_FAULT=grad-nan@step:5              the loss is finite, a gradient is NaN
    VAEFLOW_FAULT=inf@step:5:stage=vae_gan     +inf, in one stage only
    VAEFLOW_FAULT=nan@step:5:always            fails even after a rollback
    VAEFLOW_FAULT="nan@step:5;grad-nan@step:9" several faults, separated by ';'

Steps count from 1 within a stage, as `global_step` in metrics.jsonl: step N is the
optimizer step that would make global_step N. A skipped step does not advance
global_step, so step N fails on every attempt (N is retried on the next batches)
until the stage rolls back; the rollback "cures" it, as a lower learning rate cures
a real divergence, unless the fault says `always`. Whether a fault fires depends only
on the step and on the rollback count, both in the checkpoint, so a killed and resumed
run meets the same faults as an uninterrupted one.

Unset or empty, `from_env()` returns None and the trainer calls nothing of this module.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from vaeflow.config import ConfigError

ENV = "VAEFLOW_FAULT"
KINDS = ("nan", "inf", "grad-nan")
_FAULT = re.compile(r"^(?P<kind>[a-z-]+)@step:(?P<steps>\d+(?:,\d+)*)(?P<opts>(?::[a-z]+(?:=[A-Za-z0-9_]+)?)*)$")
_USAGE = "expected KIND@step:N[,N...][:stage=NAME][:always] (KIND: nan, inf, grad-nan), ';' between faults"


@dataclass(frozen=True)
class Fault:
    kind: str
    steps: frozenset[int]
    stage: str | None = None
    always: bool = False

    def fires(self, stage: str, step: int, rollbacks: int) -> bool:
        if step not in self.steps or (self.stage is not None and self.stage != stage):
            return False
        return self.always or rollbacks == 0


def _parse_one(text: str) -> Fault:
    m = _FAULT.match(text)
    if not m or m["kind"] not in KINDS:
        raise ConfigError(ENV, f"{_USAGE}; got {text!r}", source="environment")
    stage, always = None, False
    for opt in filter(None, m["opts"].split(":")):
        if opt == "always":
            always = True
        elif opt.startswith("stage="):
            stage = opt.removeprefix("stage=")
        else:
            raise ConfigError(ENV, f"unknown option {opt!r}: {_USAGE}", source="environment")
    steps = frozenset(int(s) for s in m["steps"].split(","))
    if 0 in steps:
        raise ConfigError(ENV, f"steps count from 1; got {text!r}", source="environment")
    return Fault(m["kind"], steps, stage, always)


class FaultPlan:
    """The parsed VAEFLOW_FAULT: which steps of which stage fail, and how."""

    def __init__(self, faults: list[Fault]):
        self.faults = faults

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        return cls([_parse_one(part.strip()) for part in text.split(";") if part.strip()])

    def describe(self) -> str:
        return "; ".join(
            f"{f.kind} at step {','.join(map(str, sorted(f.steps)))}"
            + (f" of {f.stage}" if f.stage else "")
            + (" (always)" if f.always else "")
            for f in self.faults
        )

    def _kinds(self, stage: str, step: int, rollbacks: int) -> set[str]:
        return {f.kind for f in self.faults if f.fires(stage, step, rollbacks)}

    def corrupt_loss(self, loss: torch.Tensor, stage: str, step: int, rollbacks: int) -> torch.Tensor:
        """The loss times NaN (or inf) when a loss fault fires: its gradients become non-finite too."""
        kinds = self._kinds(stage, step, rollbacks)
        if "nan" in kinds:
            return loss * float("nan")
        if "inf" in kinds:
            return loss + float("inf")
        return loss

    def corrupt_grads(self, params, stage: str, step: int, rollbacks: int) -> None:
        """Writes a NaN into the first gradient when a grad-nan fault fires (the loss stays finite)."""
        if "grad-nan" not in self._kinds(stage, step, rollbacks):
            return
        for p in params:
            if p.grad is not None:
                p.grad.view(-1)[0] = float("nan")
                return


def from_env(environ=None) -> FaultPlan | None:
    text = (environ if environ is not None else os.environ).get(ENV, "").strip()
    return FaultPlan.parse(text) if text else None
