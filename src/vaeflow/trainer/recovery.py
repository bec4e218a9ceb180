"""The stage trainer's side of the non-finite guard: log a skip, roll back, or stop.

`guard.StepGuard` decides; these functions act on a `StageTrainer` (its TrainState,
its run dir, its console). Events go to metrics.jsonl as records with
`"split": "event"` and to the console:

    {"split": "event", "event": "nonfinite_skip", "details": {"reason": "loss", "step": 5, ...}}
    {"split": "event", "event": "nonfinite_rollback", "details": {"checkpoint": ".../last.pt", ...}}
    {"split": "event", "event": "nonfinite_stop", "details": {...}}

A rollback truncates metrics.jsonl to the checkpoint's offset, as a resume does (the
replayed steps write their lines again), and writes back the events since that
checkpoint, then the rollback's own: a run killed after a rollback and resumed writes
the same lines as one that was never killed.
"""

from __future__ import annotations

from vaeflow import checkpoint as ckpt
from vaeflow.trainer import state as train_state
from vaeflow.trainer.guard import NonFiniteError, scale_learning_rates


def event(t, name: str, details: dict, text: str) -> None:
    st = t.state
    written = t.files.write_metrics({"stage": t.stage, "epoch": st.epoch + 1, "batch": st.batch,
                                     "global_step": st.global_step, "split": "event", "event": name, "details": details})
    if written is not None:
        t.pending_events.append(written)  # until the next last.pt: a rollback writes them again
    t.console.line(text)


def _where(t) -> str:
    st = t.state
    return f"stage {t.stage}, optimizer step {st.global_step + 1} (epoch {st.epoch + 1}, batch {st.batch})"


def on_skip(t, reason: str) -> bool:
    """Count and log a skipped step; roll back when due. True if the trainer rolled back."""
    g, st = t.guard, t.state
    g.skip(st)
    event(
        t, "nonfinite_skip",
        {"reason": reason, "step": st.global_step + 1, "consecutive": st.consecutive_skips, "skipped": st.skipped},
        f"Non-finite {reason} at {_where(t)}: step skipped ({st.consecutive_skips} in a row, {st.skipped} in this stage)",
    )
    if not g.wants_rollback(st):
        return False
    roll_back(t, reason)
    return True


def roll_back(t, reason: str) -> None:
    """Restore running/last.pt, carry the counts over, back the learning rates off."""
    g, last = t.guard, t.files.work("last.pt")
    saved = ckpt.load_vaeflow(last) if last.exists() else None
    if saved is None or not g.can_roll_back(t.state):
        stop(t, reason, last, saved)
    before = t.state
    t.state = train_state.restore(saved, t.models, t.opts, t.dist)  # weights, optimizers, RNG, data position
    # as at resume: every rank must have read the same last.pt (a node with a stale copy would train on alone)
    t.dist.check_agree("the rollback point (epoch, batch, step)", (t.state.epoch, t.state.batch, t.state.global_step))
    factor = g.rolled_back(t.state, before, saved["rollbacks"])
    scale_learning_rates([o for _, o in t.opts.named()], [s for _, s in t.opts.named_schedulers()], factor)
    t.files.truncate_metrics(t.state.metrics_offset, keep=t.pending_events)
    t.live.open(t.state.global_step)  # the replayed steps log again: cut their events (trainer/live_log.py)
    lrs = ", ".join(f"{group['lr']:.3g}" for _, opt in t.opts.named() if opt for group in opt.param_groups)
    st = t.state
    event(
        t, "nonfinite_rollback",
        {"checkpoint": str(last), "to_step": st.global_step, "rollback": st.rollbacks, "lr_factor": factor, "lr": lrs},
        f"Rolled back to {last} (step {st.global_step}, epoch {st.epoch + 1}, batch {st.batch}) after "
        f"{g.policy.max_consecutive} non-finite steps in a row; learning rates x{factor:g} to {lrs} "
        f"(rollback {st.rollbacks} of at most {g.policy.max_rollbacks})",
    )


def stop(t, reason: str, last, saved: dict | None) -> None:
    g, st = t.guard, t.state
    if saved is None:
        then = f"there is no resume checkpoint at {last} to roll back to"
    elif st.rollbacks:
        then = (f"after {st.rollbacks} rollback(s) to {last} (step {saved['global_step']}), learning rates "
                f"x{g.policy.lr_backoff ** st.rollbacks:g}; training.nonfinite.max_rollbacks={g.policy.max_rollbacks} reached")
    else:
        then = f"training.nonfinite.max_rollbacks is {g.policy.max_rollbacks}, so no rollback to {last}"
    message = (
        f"training diverged: {st.consecutive_skips} non-finite steps in a row ({reason}) at {_where(t)}, {then}. "
        f"The resume state in {t.files.running} is kept: lower the learning rate or check the data, then rerun"
    )
    t.files.write_metrics({"stage": t.stage, "epoch": st.epoch + 1, "batch": st.batch, "global_step": st.global_step,
                           "split": "event", "event": "nonfinite_stop",
                           "details": {"reason": reason, "step": st.global_step + 1, "rollbacks": st.rollbacks,
                                       "skipped": st.skipped}})
    raise NonFiniteError(message)  # the CLI prints it once: "vaeflow: error: training diverged: ..."
