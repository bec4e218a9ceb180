"""One batch: forward and backward over its micro-batches, and the optimizer step that
ends each gradient-accumulation window."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from vaeflow import collectives
from vaeflow.trainer.build import Models, Optimizers
from vaeflow.trainer.console import Meter
from vaeflow.trainer.faults import FaultPlan
from vaeflow.trainer.guard import StepGuard
from vaeflow.trainer.objective import Objective
from vaeflow.trainer.state import TrainState


@contextmanager
def _frozen(module):
    """The module's trainable parameters with requires_grad off while a graph is built through
    it (autograd records at forward time, so the later backward skips them); restored after."""
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class TrainStep:
    def __init__(self, step: dict, models: Models, objective: Objective, opts: Optimizers, dist, console,
                 guard: StepGuard, faults: FaultPlan | None = None):
        self.step, self.models, self.objective, self.opts = step, models, objective, opts
        self.dist, self.console = dist, console
        self.guard, self.faults = guard, faults  # faults: VAEFLOW_FAULT's test hook, None when unset
        self.accum = step["grad_accum_steps"]
        self.on_cuda = objective.devices.main.type == "cuda"
        self._snapshots = (None, None)
        # The trainable parameters are fixed when the stage is built (build.apply_freeze):
        # listed once, not walked through the module tree at every step.
        self._vae = [p for p in models.model.parameters() if p.requires_grad]
        self._disc = list(models.discriminator.parameters()) if opts.disc is not None else []
        # Gradient averaging over ranks, overlapped with backward (no-ops single-process).
        self.reducers = {"vae": dist.reducer(self._vae_params()), "disc": dist.reducer(self._disc_params())}

    def __call__(self, x: torch.Tensor, state: TrainState, closes_window: bool = True) -> dict:
        """Accumulate one batch's gradients; on CUDA out-of-memory, halve the micro-batches
        (`training.allow_microbatching`) and start the batch over. `closes_window`: the
        optimizer step follows this batch (its last backward starts the gradient all-reduce)."""
        while True:
            try:
                return self._chunks(x, state, closes_window)
            except torch.cuda.OutOfMemoryError:
                if not self.step["allow_microbatching"] or state.micro >= x.shape[0]:
                    raise
                state.micro *= 2
                self._restore_grads()
                torch.cuda.empty_cache()
                self.console.line(f"CUDA out of memory: splitting each batch into {state.micro} micro-batches")

    def _chunks(self, x: torch.Tensor, state: TrainState, closing: bool) -> dict:
        models, opts, objective = self.models, self.opts, self.objective
        # Keep the window's gradients so an OOM retry can start this batch over.
        window_pos = state.batch % self.accum
        keep = self.on_cuda and self.step["allow_microbatching"] and window_pos
        self._snapshots = tuple(
            [None if p.grad is None else p.grad.clone() for p in params] if keep else None
            for params in (self._vae_params(), self._disc_params())
        )
        meter = Meter()
        scale = 1.0 / (state.micro * self.accum)
        adv = objective.losses.adv
        train_disc = opts.disc is not None and adv.active(state.global_step)  # from disc_start
        adversarial = models.discriminator is not None and adv.generator_active(state.global_step) and opts.vae is not None
        chunks = x.chunk(state.micro)
        for i, chunk in enumerate(chunks):
            final = closing and i == len(chunks) - 1  # the last backward before the optimizer step
            if opts.vae is not None:
                with _frozen(models.discriminator):  # G's loss must not leave gradients in D's parameters
                    loss, recon, logs = objective.generator(models.model, models.discriminator, chunk,
                                                            state.global_step, adversarial, opts.scaler.scale)
                loss = self._checked(loss, state)
                if final:
                    self.reducers["vae"].arm()
                opts.scaler.scale(loss * scale).backward()
            else:
                with torch.no_grad(), objective.devices.autocast():
                    recon = models.model.ae_forward(chunk, sample_posterior=True).recon.float()
                logs = {}
            if train_disc:
                d_loss, d_raw = objective.discriminator(models.discriminator, chunk, recon)
                d_loss = self._checked(d_loss, state)
                if final:
                    self.reducers["disc"].arm()
                opts.scaler.scale(d_loss * scale).backward()
                logs["d_loss"] = d_raw
            meter.add(logs)
        # Per-chunk values averaged, still as tensors: converted once per log line.
        return {k: v / meter.count for k, v in meter.sums.items()}

    def _checked(self, loss: torch.Tensor, state: TrainState) -> torch.Tensor:
        """The loss as the guard will judge it (VAEFLOW_FAULT may corrupt it first)."""
        if self.faults is not None:
            loss = self.faults.corrupt_loss(loss, state)
        self.guard.observe(loss)
        return loss

    def _vae_params(self) -> list:
        return self._vae

    def _disc_params(self) -> list:
        return self._disc

    def _restore_grads(self) -> None:
        for group, snap in zip((self._vae_params(), self._disc_params()), self._snapshots):
            for p, g in zip(group, snap or [None] * len(group)):
                p.grad = None if g is None else g.clone()

    def optimizer_step(self, state: TrainState) -> str | None:
        """Average gradients over ranks; unless the guard finds the window non-finite (then
        returns its reason and drops the gradients), clip, step, update the EMA and LeCAM."""
        clip, scaler, models = self.step["grad_clip"], self.opts.scaler, self.models
        parts = ((self.opts.vae, self._vae_params, "vae"), (self.opts.disc, self._disc_params, "disc"))
        groups = [(opt, params(), part) for opt, params, part in parts if opt]
        for _, _, part in groups:
            self.reducers[part].finish()  # before unscaling: an inf on any rank skips the step on all
        every = [p for _, params, _ in groups for p in params]
        if self.faults is not None:
            self.faults.at_step(every, state)
        reason = self.guard.check(every, self.objective.devices.main, self.dist)
        if reason is None:
            for opt, params, _ in groups:
                if clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, clip)
                scaler.step(opt)
            scaler.update()
            self.dist.broadcast_norm_buffers(models.model)  # BatchNorm statistics follow rank 0
            self.dist.broadcast_norm_buffers(models.discriminator)
        for opt, _, _ in groups:
            opt.zero_grad(set_to_none=True)
        if reason is not None:
            if models.lecam is not None:
                models.lecam.discard()
            return reason
        if models.ema is not None and self.opts.vae is not None:
            models.ema.update(models.model)
        if models.lecam is not None:
            models.lecam.commit(self._rank_mean)
        return None

    def _rank_mean(self, t: torch.Tensor) -> torch.Tensor:
        if collectives.active():
            collectives.all_reduce(t)
            t = t / collectives.world()
        return t
