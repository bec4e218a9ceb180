"""The trainer's side of the non-finite guard: log a skip, roll back, or stop.

`guard.StepGuard` decides; this module acts on the stage trainer `t` (its checkpoint,
its metrics.jsonl, its console). Events go to metrics.jsonl as records with
`"split": "event"` and to the console:

    {"split": "event", "event": "nonfinite_skip", "details": {"reason": "loss", "step": 5, ...}}
    {"split": "event", "event": "nonfinite_rollback", "details": {"checkpoint": ".../last.pt", ...}}
    {"split": "event", "event": "nonfinite_stop", ...}

A rollback truncates metrics.jsonl to the checkpoint's offset, as a resume does (the
replayed steps write their lines again), then writes back the events since that
checkpoint and the rollback itself: so a run killed after a rollback and resumed
writes the same lines as one that was never killed.
"""

from __future__ import annotations

import json

from vaeflow import checkpoint as ckpt
from vaeflow.trainer.guard import NonFiniteError, scale_learning_rates


def event(t, name: str, details: dict, text: str) -> None:
    written = t._write_jsonl({"split": "event", "event": name, "details": details})
    if written is not None:
        t.pending_events.append(written)  # until the next last.pt: a rollback writes them again
    t.console.line(text)


def _where(t) -> str:
    return f"stage {t.stage}, optimizer step {t.global_step + 1} (epoch {t.epoch + 1}, batch {t.batch})"


def on_skip(t, reason: str) -> bool:
    """Count and log a skipped step; roll back when due. True if the trainer rolled back."""
    g = t.guard
    g.skip()
    event(
        t, "nonfinite_skip",
        {"reason": reason, "step": t.global_step + 1, "consecutive": g.consecutive, "skipped": g.skipped},
        f"Non-finite {reason} at {_where(t)}: step skipped ({g.consecutive} in a row, {g.skipped} in this stage)",
    )
    if not g.wants_rollback():
        return False
    roll_back(t, reason)
    return True


def roll_back(t, reason: str) -> None:
    g, last = t.guard, t.paths.work("last.pt")
    st = ckpt.load_vaeflow(last) if last.exists() else None
    if st is None or not g.can_roll_back():
        stop(t, reason, last, st)
    counters, pending = g.state_dict(), list(t.pending_events)
    t.load_state(st)  # weights, optimizers, EMA, RNG, data position: as at that checkpoint
    g.load_state_dict(counters)  # but the counts go on
    factor = g.rolled_back(st.get("nonfinite"))
    scale_learning_rates(t.optimizers(), t.schedulers(), factor)
    if t.dist.main:
        with open(t.paths.work("metrics.jsonl"), "a+b") as f:
            f.truncate(t.metrics_offset)
            f.writelines(json.dumps(record).encode() + b"\n" for record in pending)
    t.pending_events = pending
    lrs = ", ".join(f"{group['lr']:.3g}" for opt in t.optimizers() for group in opt.param_groups)
    event(
        t, "nonfinite_rollback",
        {"checkpoint": str(last), "to_step": st["global_step"], "rollback": g.rollbacks, "lr_factor": factor, "lr": lrs},
        f"Rolled back to {last} (step {st['global_step']}, epoch {t.epoch + 1}, batch {t.batch}) after "
        f"{g.policy.max_consecutive} non-finite steps in a row; learning rates x{factor:g} to {lrs} "
        f"(rollback {g.rollbacks} of at most {g.policy.max_rollbacks})",
    )


def stop(t, reason: str, last, st) -> None:
    g = t.guard
    if st is None:
        then = f"there is no resume checkpoint at {last} to roll back to"
    elif g.rollbacks:
        then = (f"after {g.rollbacks} rollback(s) to {last} (step {st['global_step']}), learning rates "
                f"x{g.policy.lr_backoff ** g.rollbacks:g}; training.nonfinite.max_rollbacks={g.policy.max_rollbacks} reached")
    else:
        then = f"training.nonfinite.max_rollbacks is {g.policy.max_rollbacks}, so no rollback to {last}"
    message = (
        f"training diverged: {g.consecutive} non-finite steps in a row ({reason}) at {_where(t)}, {then}. "
        f"The resume state in {t.paths.running} is kept: lower the learning rate or check the data, then rerun"
    )
    record = {"split": "event", "event": "nonfinite_stop", "details": {"reason": reason, "step": t.global_step + 1,
                                                                        "rollbacks": g.rollbacks, "skipped": g.skipped}}
    t._write_jsonl(record)
    t.console.line(f"ERROR: {message}")
    raise NonFiniteError(message)
