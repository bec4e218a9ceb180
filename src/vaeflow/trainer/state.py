"""What a checkpoint holds: the weights and optimizer states, the RNG streams, and a
`TrainState` with the stage's progress. Each fact is recorded once; `pipeline_metadata`
is a read-only view of them in the layout older pipeline tools read (never read back)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from vaeflow import checkpoint as ckpt
from vaeflow import provenance
from vaeflow.trainer import rng
from vaeflow.trainer.build import Models, Optimizers


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch completed
    micro: int = 1  # chunks per batch; doubled on CUDA out-of-memory
    global_step: int = 0  # optimizer steps taken
    best_val: float = math.inf
    smoothed: float | None = None  # the loss_threshold transition's smoothed metric
    finished: bool = False
    metrics_offset: int = 0  # size of metrics.jsonl when this state was saved
    history: dict = field(default_factory=dict)  # metric name -> one value per epoch
    skipped: int = 0  # non-finite steps skipped (trainer/guard.py)
    consecutive_skips: int = 0
    rollbacks: int = 0

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass(frozen=True)
class StageId:
    config: dict
    stage: str
    index: int
    n_stages: int
    fingerprint: str  # of the stage's config view and prior artifact: resume only into the same run


def checkpoint(sid: StageId, state: TrainState, models: Models, opts: Optimizers, dist) -> dict:
    """The checkpoint dict (every rank calls it: it gathers their RNG states)."""
    ema = models.ema
    return {
        "format": ckpt.FORMAT,
        "config": sid.config,
        "stage": sid.stage,
        "stage_index": sid.index,
        "fingerprint": sid.fingerprint,
        # code, commit, tool versions; "init": the pretrained source (model.ckpt_path) and its sha256
        "provenance": {**provenance.record(), **({"init": models.source} if models.source else {})},
        "model": models.model.state_dict(),
        "ema": ema.state_dict()["weights"] if ema is not None else None,
        "ema_state": {"num_updates": ema.num_updates} if ema is not None else None,
        "discriminator": models.discriminator.state_dict() if models.discriminator is not None else None,
        "optimizers": {k: o.state_dict() for k, o in opts.named() if o},
        "schedulers": {k: s.state_dict() for k, s in opts.named_schedulers() if s},
        "scaler": opts.scaler.state_dict(),
        "lecam": models.lecam.state_dict() if models.lecam is not None else None,
        "rng": rng.capture(),
        "rng_ranks": dist.gather(rng.capture()) if dist.enabled else None,
        **asdict(state),
        "pipeline_metadata": {
            "current_step": sid.index,
            "current_step_name": sid.stage,
            "total_steps": sid.n_stages,
            "current_step_epoch": state.epoch,
            "batch": state.batch,
            "global_step": state.global_step,
            "step_metrics": {sid.stage: state.history},
        },
    }


def restore(st: dict, models: Models, opts: Optimizers, dist) -> TrainState:
    """Load a checkpoint's weights, optimizer and RNG states; returns its progress."""
    models.model.load_state_dict(st["model"])
    if models.ema is not None:
        models.ema.load_state_dict({"weights": st["ema"], "num_updates": st["ema_state"]["num_updates"]})
    if models.discriminator is not None:
        models.discriminator.load_state_dict(st["discriminator"])
    for key, opt in opts.named():
        if opt is not None:
            opt.load_state_dict(st["optimizers"][key])
    for key, sch in opts.named_schedulers():
        if sch is not None:
            sch.load_state_dict(st["schedulers"][key])
    opts.scaler.load_state_dict(st["scaler"])
    if models.lecam is not None and st.get("lecam") is not None:
        models.lecam.load_state_dict(st["lecam"])
    ranks = st.get("rng_ranks")
    if dist.enabled and ranks and len(ranks) == dist.world:
        rng.restore(ranks[dist.rank])
    elif not dist.enabled:
        rng.restore(st["rng"])
    return TrainState(**{k: st[k] for k in TrainState.keys()})
