"""One batch: forward and backward over its micro-batches, and the optimizer step that
ends each gradient-accumulation window."""

from __future__ import annotations

import torch

from vaeflow.trainer.build import Models, Optimizers
from vaeflow.trainer.console import Meter
from vaeflow.trainer.objective import Objective
from vaeflow.trainer.state import TrainState


class TrainStep:
    def __init__(self, step: dict, models: Models, objective: Objective, opts: Optimizers, dist, console):
        self.step, self.models, self.objective, self.opts = step, models, objective, opts
        self.dist, self.console = dist, console
        self.accum = step["grad_accum_steps"]
        self.on_cuda = objective.devices.main.type == "cuda"
        self._snapshots = (None, None)
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
        adv_active = objective.losses.adv.active(state.global_step)
        train_disc = opts.disc is not None and adv_active
        adversarial = models.discriminator is not None and adv_active and opts.vae is not None
        chunks = x.chunk(state.micro)
        for i, chunk in enumerate(chunks):
            final = closing and i == len(chunks) - 1  # the last backward before the optimizer step
            if opts.vae is not None:
                loss, recon, logs = objective.generator(models.model, models.discriminator, chunk, state.global_step, adversarial)
                if final:
                    self.reducers["vae"].arm()
                opts.scaler.scale(loss * scale).backward()
            else:
                with torch.no_grad(), objective.devices.autocast():
                    recon = models.model.ae_forward(chunk, sample_posterior=True).recon.float()
                logs = {}
            if train_disc:
                d_loss, d_raw = objective.discriminator(models.discriminator, chunk, recon)
                if final:
                    self.reducers["disc"].arm()
                opts.scaler.scale(d_loss * scale).backward()
                logs["d_loss"] = d_raw
            meter.add(logs)
        # Per-chunk values averaged, still as tensors: converted once per log line.
        return {k: v / meter.count for k, v in meter.sums.items()}

    def _vae_params(self) -> list:
        return [p for p in self.models.model.parameters() if p.requires_grad]

    def _disc_params(self) -> list:
        return list(self.models.discriminator.parameters()) if self.opts.disc is not None else []

    def _restore_grads(self) -> None:
        for group, snap in zip((self._vae_params(), self._disc_params()), self._snapshots):
            for p, g in zip(group, snap or [None] * len(group)):
                p.grad = None if g is None else g.clone()

    def optimizer_step(self) -> None:
        """Average gradients over ranks, clip, step, then update the EMA weights."""
        clip, scaler, models = self.step["grad_clip"], self.opts.scaler, self.models
        for opt, params, part in ((self.opts.vae, self._vae_params, "vae"), (self.opts.disc, self._disc_params, "disc")):
            if opt is None:
                continue
            self.reducers[part].finish()  # before unscaling: an inf on any rank skips the step on all
            if clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params(), clip)
            scaler.step(opt)
        scaler.update()
        self.dist.broadcast_norm_buffers(models.model)  # BatchNorm statistics follow rank 0
        self.dist.broadcast_norm_buffers(models.discriminator)
        for _, opt in self.opts.named():
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        if models.ema is not None and self.opts.vae is not None:
            models.ema.update(models.model)
