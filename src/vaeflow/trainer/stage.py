"""One training stage, read top to bottom: build, resume, train epochs, publish.

`StageTrainer.__init__` builds everything (trainer/build.py), `run()` is the loop, and
`_end_epoch()` validates, steps the schedulers, saves and decides the transition.
The files a stage writes and how it resumes: trainer/rundir.py.
"""

from __future__ import annotations

import time

import torch

from vaeflow import checkpoint as ckpt
from vaeflow.config import (fingerprint, logged_metrics, model_family, resolve_steps, stage_index, stage_names,
                            stage_view)
from vaeflow.layout import Layout
from vaeflow.metrics import to_model_range
from vaeflow.trainer import faults, recovery, rng
from vaeflow.trainer import state as train_state
from vaeflow.trainer.batches import BatchFetcher, batches_per_epoch, epoch_order
from vaeflow.trainer.build import (apply_modes, build_devices, build_losses, build_models, build_optimizers, first_image,
                                   max_epochs)
from vaeflow.trainer.console import Console, Meter, train_line
from vaeflow.trainer.distributed import Dist, init_from_env
from vaeflow.trainer.guard import Policy, StepGuard, all_finite
from vaeflow.trainer.live_log import LiveLog
from vaeflow.trainer.noise import SampleNoise
from vaeflow.trainer.objective import Objective
from vaeflow.trainer.precision import choose_precision
from vaeflow.trainer.rundir import RunDir
from vaeflow.trainer.state import StageId, TrainState
from vaeflow.trainer.step import TrainStep
from vaeflow.trainer.validation import N_FIXED_SAMPLES, prior_noise, save_grids, validate


class StageTrainer:
    """Trains one stage of the pipeline. `run()` returns the stage summary."""

    def __init__(self, config: dict, stage: str, results_dir, train_ds, val_ds, console: Console | None = None):
        self.config, self.stage, self.tcfg = config, stage, config["training"]
        self.index = stage_index(config, stage)
        self.n_stages = len(stage_names(config))
        self.step = s = resolve_steps(config)[self.index]
        self.dist = Dist()
        self.console = console or Console(enabled=self.dist.main)
        self.seed = config["seed"]
        rng.seed_everything(self.seed + self.index)  # the same on every rank: identical initial weights

        self.devices = build_devices(self.tcfg, s, self.dist, self.console)
        size, dims = config["data"].get("image_size"), config["data"].get("spatial_dims", 2)
        self.train_data = BatchFetcher(train_ds, self.tcfg["workers"], size, dims)
        self.val_data = BatchFetcher(val_ds, 0, size, dims)
        if len(self.train_data) == 0 or len(self.val_data) == 0:
            raise ValueError(f"stage {stage}: the train and validation splits must not be empty")

        layout = Layout(results_dir)
        init_path = layout.prior_checkpoint(stage_names(config), stage)
        self.models = build_models(config, stage, s, self.devices, init_path, first_image(train_ds), self.console)
        self.precision = choose_precision(s["use_amp"], s["amp_dtype"], self.devices.main, self.models.model,
                                          self.train_data.fetch(torch.arange(1)).to(self.devices.main))
        self.console.line(self.precision.describe())
        self.devices.amp_dtype = self.precision.dtype
        losses = build_losses(s, self.models.model, self.devices.perc, self.console, self.models.lecam)
        self.opts = build_optimizers(stage, s, self.models, self.devices)
        self.objective = Objective(s, losses, self.devices, len(self.train_data))
        self.guard = StepGuard(Policy.from_config(self.tcfg), scaler_enabled=self.opts.scaler.is_enabled())
        self.pending_events: list[dict] = []  # guard events since the last resume checkpoint
        fault_plan = faults.from_env(stage)  # None unless VAEFLOW_FAULT is set: then no code path changes
        if fault_plan is not None:
            self.console.line(f"WARNING: {faults.ENV} is set (test hook): {fault_plan.describe()}")
        self.train_step = TrainStep(s, self.models, self.objective, self.opts, self.dist, self.console, self.guard,
                                    fault_plan, SampleNoise(self.seed, self.index))

        self.batch_size = self.tcfg["batch_size"]
        self.n_batches = batches_per_epoch(len(self.train_data), self.batch_size, s["max_steps"])
        self.max_epochs = max_epochs(s)
        self.logged = logged_metrics(s, model_family(config["model"]["type"]))
        self.state = TrainState()
        self.id = StageId(config, stage, self.index, self.n_stages, fingerprint(
            {"view": stage_view(config, stage), "init": ckpt.file_digest(init_path) if init_path else None}
        ))
        self.files = RunDir(layout.stage(stage), self.dist, self.console)
        self.live = LiveLog.for_stage(config, layout.stage(stage), self.dist, self.opts)  # logging.tensorboard
        self.fixed_val = self.val_data.fetch(torch.arange(min(N_FIXED_SAMPLES, len(self.val_data))))
        self.fixed_noise = prior_noise(self.models.model, N_FIXED_SAMPLES, self.seed)
        self._sync_ranks()

    def _sync_ranks(self) -> None:
        """Every rank starts from rank 0's weights; other ranks draw their own posterior noise
        (rank 0 keeps the single-process stream)."""
        if not self.dist.enabled:
            return
        m = self.models
        for module in (m.model, m.discriminator, m.ema.model if m.ema is not None else None):
            self.dist.broadcast_module(module)
        if self.dist.rank:
            rng.seed_everything(self.seed + self.index + 104_729 * self.dist.rank)
        self.console.line(f"Data parallel over {self.dist.world} processes: {self.batch_size // self.dist.world} images each per batch")

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        self._resume()
        st, models, dist = self.state, self.models, self.dist
        self.files.running.mkdir(parents=True, exist_ok=True)
        t_start, images_seen = time.perf_counter(), 0
        apply_modes(models)  # frozen parts in eval mode: bit-identical through the stage
        while not st.finished:
            order = epoch_order(len(self.train_data), self.seed, self.index, st.epoch)
            self.console.start_bar(self.n_batches, st.batch, f"{self.stage} epoch {st.epoch + 1}")
            meter, epoch_meter, window = Meter(), Meter(), Meter()
            t_log, imgs_log, rolled_back = time.perf_counter(), 0, False
            self.train_data.set_epoch(self.index, st.epoch)  # dynamic binarization keyed by (stage, epoch, item)
            accum = self.train_step.accum
            for rows, x in self.train_data.iterate(order, self.batch_size, st.batch, self.n_batches, dist.shard):
                x = to_model_range(x, models.model).to(self.devices.main, non_blocking=True)
                closes = (st.batch + 1) % accum == 0 or st.batch + 1 == self.n_batches
                size = min(accum, self.n_batches - st.batch // accum * accum)  # the epoch's last window may be shorter
                values = self.train_step(x, st, closes, size, rows)  # forward + backward; the step ends the window
                st.batch += 1
                imgs_log, images_seen = imgs_log + x.shape[0], images_seen + x.shape[0]
                window.add(values)
                self.console.tick()
                if st.batch % self.train_step.accum and st.batch != self.n_batches:
                    continue
                reason = self.train_step.optimizer_step(st)
                if reason is not None:  # skipped (trainer/guard.py): its losses stay out of the means
                    window = Meter()
                    if rolled_back := recovery.on_skip(self, reason):
                        st = self.state  # restored from running/last.pt
                        break
                    continue
                self.guard.passed(st)
                meter.merge(window)
                epoch_meter.merge(window)
                window = Meter()
                st.global_step += 1
                if st.global_step % self.tcfg["log_every"] == 0 or st.batch == self.n_batches:
                    dt = time.perf_counter() - t_log
                    self._log(dist.mean_dict(meter.means()), dt / max(1, meter.count), imgs_log * dist.world / max(dt, 1e-9))
                    meter, t_log, imgs_log = Meter(), time.perf_counter(), 0
                if st.global_step % self.tcfg["save_every"] == 0 and st.batch != self.n_batches:
                    self._save_last()
            self.console.close_bar()
            if not rolled_back:
                self._end_epoch(dist.mean_dict(epoch_meter.means()))
        self.live.close()
        self.files.publish()
        return self._summary(time.perf_counter() - t_start, images_seen)

    def _end_epoch(self, train_means: dict) -> None:
        st = self.state
        val = validate(self.models.eval_model(), self.val_data, self.objective,
                       self.config["evaluation"]["batch_size"], self.devices.main)
        for k, v in {**train_means, **val}.items():
            st.history.setdefault(k, []).append(v)
        self._write_metrics("val", val)
        self.live.scalars("val", val, st.global_step)
        self.console.line(f"Step {self.stage} ({self.index + 1}/{self.n_stages}) | Epoch {st.epoch + 1}/{self.max_epochs} | "
                          + " | ".join(f"{k}: {v:.5f}" for k, v in val.items()))
        for _, sch in self.opts.named_schedulers():
            if isinstance(sch, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sch.step(val["val_loss"])
            elif sch is not None:
                sch.step()
        if self.tcfg["sample_every_epoch"] and self.dist.main:
            tag = f"{self.stage}_{self.index + 1:03d}_{st.epoch + 1:03d}_{self.id.fingerprint[:6]}"
            with self.dist.rank_local("rank 0's sample grids"):  # a collective in here is an error, not a hang
                grids = save_grids(self.models.eval_model(), self.fixed_val, self.fixed_noise, self.devices.main, self.files.layout, tag)
                self.live.grids(grids, st.global_step)
        improved = val["val_loss"] < st.best_val
        if improved:
            st.best_val = val["val_loss"]
        st.epoch += 1
        st.batch = 0
        st.finished = self._transition(train_means, val)
        self._save_last(improved)

    def _transition(self, train_means: dict, val: dict) -> bool:
        """Whether the stage is done: after n_epochs, or once the smoothed metric falls below
        the threshold (transition_on.mode: loss_threshold, at most max_epochs)."""
        t, st = self.step["transition_on"], self.state
        if t.get("mode", "epoch") == "epoch":
            return st.epoch >= self.step["n_epochs"]
        value = {**train_means, **val}.get(t["metric"])
        if value is not None:
            a = t.get("smoothing", 0.5)
            st.smoothed = value if st.smoothed is None else a * st.smoothed + (1 - a) * value
            if st.smoothed < t["threshold"]:
                self.console.line(f"Transition: smoothed {t['metric']} {st.smoothed:.5f} < {t['threshold']}")
                return True
        if st.epoch >= self.max_epochs:
            self.console.line(
                f"WARNING: {t['metric']} never fell below {t['threshold']}; stopping at max_epochs={self.max_epochs}"
            )
            return True
        return False

    # ------------------------------------------------------------------ checkpoints and logs
    def _save(self, name: str, also: tuple[str, ...] = ()) -> None:
        self.files.save(name, train_state.checkpoint(self.id, self.state, self.models, self.opts, self.dist), also)

    def _save_last(self, best: bool = False) -> None:
        """The resume checkpoint, last.pt; with best, the same file as best.pt too. best.pt is
        written first: a kill between the two resumes from the older last.pt and redoes the
        epoch, so best.pt cannot miss an improvement."""
        if not all_finite([self.models.model, self.models.discriminator]):  # keep the last good rollback target
            self.console.line(f"WARNING: non-finite weights at step {self.state.global_step}: resume checkpoint not updated")
            if best:
                self._save("best.pt")
            return
        self.state.metrics_offset = self.files.metrics_size()
        if best:
            self._save("best.pt", also=("last.pt",))
        else:
            self._save("last.pt")
        self.pending_events = []

    def _resume(self) -> None:
        saved = self.files.resume_state(self.id.fingerprint)
        st = self.state if saved is None else train_state.restore(saved, self.models, self.opts, self.dist)
        self.dist.check_agree("the resume point (epoch, batch, step)", (st.epoch, st.batch, st.global_step))
        self.live.open(None if saved is None else st.global_step)  # a resume cuts the events after its step
        if saved is None:
            if self.guard.policy.max_rollbacks > 0:
                self._save_last()  # the first rollback target
            return
        self.state = st
        self.files.truncate_metrics(self.state.metrics_offset)
        self.console.line(
            f"Resuming from checkpoint: step={self.index + 1} ({self.stage}), epoch={self.state.epoch + 1}, batch={self.state.batch}"
        )

    def _log(self, values: dict, batch_time: float, imgs_per_s: float) -> None:
        st = self.state
        where = (f"Step {self.stage} ({self.index + 1}/{self.n_stages}) | Epoch {st.epoch + 1}/{self.max_epochs} | "
                 f"Batch {st.batch}/{self.n_batches}")
        self.console.line(train_line(where, values, self.logged["train"], batch_time, imgs_per_s))
        self._write_metrics("train", values)
        self.live.scalars("train", values, st.global_step, imgs_per_s)

    def _write_metrics(self, split: str, values: dict) -> None:
        st = self.state
        self.files.write_metrics({"stage": self.stage, "epoch": st.epoch + 1, "batch": st.batch,
                                  "global_step": st.global_step, "split": split, "metrics": values})

    def _summary(self, elapsed: float, images_seen: int) -> dict:
        st = self.state
        summary = {
            "stage": self.stage,
            "epochs": st.epoch,
            "global_step": st.global_step,
            "best_val_loss": st.best_val,
            "seconds": round(elapsed, 2),
            "images_per_s": round(images_seen * self.dist.world / max(elapsed, 1e-9), 1),
            "nonfinite_skipped": st.skipped,
            "rollbacks": st.rollbacks,
        }
        self.console.line(
            f"Stage {self.stage} done: {st.epoch} epochs, {st.global_step} steps, "
            f"best val_loss {st.best_val:.5f}, {elapsed:.1f}s this run ({summary['images_per_s']:.0f} img/s)"
            + (f"; {st.skipped} non-finite steps skipped, {st.rollbacks} rollback(s)" if st.skipped else "")
        )
        return summary


def run_stage(config: dict, stage: str, results_dir="results", train_ds=None, val_ds=None) -> dict:
    """Train one stage; datasets default to the prepared splits under results/data."""
    created = init_from_env(config["training"]["distributed"])  # False if the caller set one up
    try:
        if train_ds is None or val_ds is None:
            train_ds, val_ds = _prepared_splits(config, results_dir, train_ds, val_ds)
        return StageTrainer(config, stage, results_dir, train_ds, val_ds).run()
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _prepared_splits(config: dict, results_dir, train_ds, val_ds):
    from vaeflow.data import PreparedDataset, check_prepared

    data_dir = Layout(results_dir).data
    check_prepared(config["data"], data_dir)
    train_ds = train_ds or PreparedDataset(data_dir, "train", binarize=config["data"]["binarize"], seed=config["seed"])
    val_ds = val_ds or PreparedDataset(data_dir, "val", binarize="none", seed=config["seed"])
    return train_ds, val_ds
