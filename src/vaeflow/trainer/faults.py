"""VAEFLOW_FAULT: a test hook that makes chosen optimizer steps fail, to exercise the guard.

    VAEFLOW_FAULT=nan@step:17                  the loss of optimizer step 17 is NaN
    VAEFLOW_FAULT=nan@step:5,6,7               several steps
    VAEFLOW_FAULT=grad-nan@step:5              the loss is finite, a gradient is NaN
    VAEFLOW_FAULT=inf@step:5:stage=vae_gan     +inf, in one stage only
    VAEFLOW_FAULT=nan@step:5:once              only the first attempt of step 5 fails
    VAEFLOW_FAULT=nan@step:5:always            fails even after rollbacks
    VAEFLOW_FAULT=kill@step:8:rollbacks=1      SIGKILL at step 8 once the stage has rolled back once
    VAEFLOW_FAULT=stop@step:7:rank=1           SIGSTOP on rank 1 at step 7: a hung worker, alive
    VAEFLOW_FAULT=nan@step:5:rank=1            on data-parallel rank 1 only (RANK, set by torchrun)
    VAEFLOW_FAULT=oom@step:5:rank=1            CUDA out-of-memory on rank 1 in the first batch of step 5
                                               (once; with training.allow_microbatching the batch is
                                               split, on every rank, and started over; on any device)
    VAEFLOW_FAULT="nan@step:5;kill@step:9"     several faults, separated by ';'

Steps count from 1 within a stage, as `global_step` in metrics.jsonl: step N is the
optimizer step that would make global_step N. A skipped step does not advance
global_step, so step N is attempted again on the next batch, and by default fails again,
until the stage rolls back: the rollback "cures" it, as a lower learning rate cures a
real divergence. `once` fails only the first attempt (one skip, no rollback); `always`
fails every attempt (the stage stops after training.nonfinite.max_rollbacks);
`rollbacks=K` fires only after exactly K rollbacks. Whether a fault fires depends only on
the step and on counters kept in the checkpoint, so a killed and resumed run meets the
same faults as an uninterrupted one. `kill` kills the process (SIGKILL) at that point of
the step, as a node failure would, for resume tests; `stop` stops it (SIGSTOP), as a hung
worker would, for collective-timeout tests.

Unset or empty, `from_env()` returns None and the trainer calls nothing of this module.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from dataclasses import dataclass

import torch

from vaeflow.config import ConfigError

ENV = "VAEFLOW_FAULT"
KINDS = ("nan", "inf", "grad-nan", "kill", "stop", "oom")
_FAULT = re.compile(r"^(?P<kind>[a-z-]+)@step:(?P<steps>\d+(?:,\d+)*)(?P<opts>(?::[a-z]+(?:=[A-Za-z0-9_]*)?)*)$")
_USAGE = ("expected KIND@step:N[,N...][:stage=NAME][:rank=R][:once|:always|:rollbacks=K] (KIND: nan, inf, grad-nan, kill, stop, oom), "
          "';' between faults")


@dataclass(frozen=True)
class Fault:
    kind: str
    steps: frozenset[int]
    stage: str | None = None
    when: str = "rollbacks=0"  # once | always | rollbacks=K
    rank: int | None = None

    def fires(self, step: int, rollbacks: int, consecutive: int) -> bool:
        """At attempt `step` (from 1), after `rollbacks` rollbacks and `consecutive` skips in a row."""
        if step not in self.steps:
            return False
        if self.rank is not None and self.rank != int(os.environ.get("RANK", "0")):
            return False
        if self.when == "always":
            return True
        if self.when == "once":
            return consecutive == 0 and rollbacks == 0
        return rollbacks == int(self.when.removeprefix("rollbacks="))


def _parse_one(text: str) -> Fault:
    m = _FAULT.match(text)
    if not m or m["kind"] not in KINDS:
        raise ConfigError(ENV, f"{_USAGE}; got {text!r}", source="environment")
    stage, when, rank = None, "rollbacks=0", None
    for opt in filter(None, m["opts"].split(":")):
        if opt in ("once", "always") or re.fullmatch(r"rollbacks=\d+", opt):
            when = opt
        elif re.fullmatch(r"rank=\d+", opt):
            rank = int(opt.removeprefix("rank="))
        elif opt.startswith("stage=") and len(opt) > len("stage="):
            stage = opt.removeprefix("stage=")
        else:
            raise ConfigError(ENV, f"unknown option {opt!r}: {_USAGE}", source="environment")
    steps = frozenset(int(s) for s in m["steps"].split(","))
    if 0 in steps:
        raise ConfigError(ENV, f"steps count from 1; got {text!r}", source="environment")
    return Fault(m["kind"], steps, stage, when, rank)


class FaultPlan:
    """The parsed VAEFLOW_FAULT, for one stage: which of its steps fail, and how. Whether a
    fault fires is read from the stage's TrainState (global_step, rollbacks, consecutive_skips)."""

    def __init__(self, faults: list[Fault], stage: str | None = None):
        self.faults = [f for f in faults if stage is None or f.stage in (None, stage)]
        self.stage = stage

    @classmethod
    def parse(cls, text: str, stage: str | None = None) -> FaultPlan:
        return cls([_parse_one(part.strip()) for part in text.split(";") if part.strip()], stage)

    def describe(self) -> str:
        return "; ".join(
            f"{f.kind} at step {','.join(map(str, sorted(f.steps)))}" + (f" of {f.stage}" if f.stage else "")
            + (f" on rank {f.rank}" if f.rank is not None else "")
            + ("" if f.when == "rollbacks=0" else f" ({f.when})")
            for f in self.faults
        ) or "nothing in this stage"

    def has(self, kind: str) -> bool:
        return any(f.kind == kind for f in self.faults)

    def out_of_memory(self, state) -> None:
        """Raise CUDA's out-of-memory error at the start of a batch of the faulted step, once
        per batch and micro-batch count (the split that follows is the cure)."""
        if "oom" in self._kinds(state) and state.micro == 1:
            raise torch.cuda.OutOfMemoryError(f"VAEFLOW_FAULT: out of memory at step {state.global_step + 1}")

    def _kinds(self, state) -> set[str]:
        step = state.global_step + 1  # the step being attempted
        return {f.kind for f in self.faults if f.fires(step, state.rollbacks, state.consecutive_skips)}

    def corrupt_loss(self, loss: torch.Tensor, state) -> torch.Tensor:
        """The loss times NaN (or plus inf) when a loss fault fires: its gradients turn non-finite too."""
        kinds = self._kinds(state)
        if "nan" in kinds:
            return loss * float("nan")
        if "inf" in kinds:
            return loss + float("inf")
        return loss

    def at_step(self, params, state) -> None:
        """At the optimizer step, before the guard looks: a NaN into the first gradient
        (grad-nan), SIGKILL (kill) or SIGSTOP (stop) of this process."""
        kinds = self._kinds(state)
        for kind, sig in (("kill", signal.SIGKILL), ("stop", signal.SIGSTOP)):
            if kind in kinds:
                sys.stdout.flush()
                os.kill(os.getpid(), sig)
        if "grad-nan" not in kinds:
            return
        for p in params:
            if p.grad is not None:
                p.grad.view(-1)[0] = float("nan")
                return


def from_env(stage: str | None = None, environ=None) -> FaultPlan | None:
    """The faults VAEFLOW_FAULT sets for `stage` (all stages: None); None when unset or empty."""
    text = (environ if environ is not None else os.environ).get(ENV, "").strip()
    return FaultPlan.parse(text, stage) if text else None
