"""One batch: forward and backward over its micro-batches, and the optimizer step that
ends each gradient-accumulation window.

Weights: every loss is a mean over its chunk, so chunk i of a batch of B images counts
n_i / B, and each batch of a window of W batches counts 1 / W (the last window of an epoch
may be shorter than grad_accum_steps). The window's gradient is then the mean over its
images, however the batches were split (tests/invariants/).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from vaeflow import collectives
from vaeflow.models.quantizers import VectorQuantizer
from vaeflow.trainer.build import Models, Optimizers
from vaeflow.trainer.faults import FaultPlan
from vaeflow.trainer.guard import StepGuard
from vaeflow.trainer.noise import SampleNoise
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


def chunk_sizes(batch: int, micro: int) -> list[int]:
    """Micro-batch sizes of a batch split `micro` ways (torch.chunk's: fewer, unequal chunks
    when micro does not divide the batch)."""
    size = -(-batch // micro)
    return [min(size, batch - start) for start in range(0, batch, size)]


class TrainStep:
    def __init__(self, step: dict, models: Models, objective: Objective, opts: Optimizers, dist, console,
                 guard: StepGuard, faults: FaultPlan | None = None, noise: SampleNoise | None = None):
        self.step, self.models, self.objective, self.opts = step, models, objective, opts
        self.dist, self.console = dist, console
        self.guard, self.faults = guard, faults  # faults: VAEFLOW_FAULT's test hook, None when unset
        self.noise = noise
        self.accum = step["grad_accum_steps"]
        self.on_cuda = objective.devices.main.type == "cuda"
        # The trainable parameters are fixed when the stage is built (build.apply_freeze):
        # listed once, not walked through the module tree at every step.
        self._vae = [p for p in models.model.parameters() if p.requires_grad]
        self._disc = list(models.discriminator.parameters()) if opts.disc is not None else []
        # Gradient averaging over ranks, overlapped with backward (no-ops single-process). One
        # process group each: with a parameter unused on some ranks, the generator's late
        # buckets start in finish() there, after the discriminator's; on a shared group the
        # ranks would pair different buckets and average G's gradients with D's.
        self.reducers = {"vae": dist.reducer(self._vae_params(), own_group=True),
                         "disc": dist.reducer(self._disc_params(), own_group=True)}
        # Training state a batch changes besides gradients: what a retry after out-of-memory
        # puts back. Quantizer EMA statistics wait for the optimizer step (one update per window).
        self.quantizers = [m for m in models.model.modules() if isinstance(m, VectorQuantizer) and m.ema]
        for q in self.quantizers:
            q.defer_ema = True
        modules = [models.model] + ([models.discriminator] if models.discriminator is not None else [])
        self.norm_buffers = [b for mod in modules for m in mod.modules()
                             if isinstance(m, torch.nn.modules.batchnorm._NormBase) for b in m.buffers()]
        injected = faults is not None and faults.has("oom")
        self.can_retry = step["allow_microbatching"] and (self.on_cuda or injected)
        self.votes = self.can_retry and dist.enabled  # every rank splits together (collectives.oom_votes)
        if self.votes:
            collectives.init_votes()

    def __call__(self, x: torch.Tensor, state: TrainState, closes_window: bool = True, window: int | None = None,
                 rows: torch.Tensor | None = None) -> dict:
        """Accumulate one batch's gradients. `window`: batches in this accumulation window
        (default grad_accum_steps); `rows`: the batch's dataset indices (keys of its posterior
        noise, trainer/noise.py); `closes_window`: the optimizer step follows this batch.

        On CUDA out-of-memory (`training.allow_microbatching`), every rank doubles the
        micro-batch count and starts the batch over from what it held before: gradients,
        BatchNorm statistics, quantizer and LeCAM statistics, RNG state."""
        window = window or self.accum
        while True:
            saved = self._save_batch_start(state) if self.can_retry else None
            try:
                with collectives.oom_votes(self.votes):
                    values = self._chunks(x, state, closes_window, window, rows)
                if self.votes:
                    collectives.vote_oom(False)  # pairs with a rank that failed after its last collective
                return values
            except (torch.cuda.OutOfMemoryError, collectives.PeerOutOfMemory) as exc:
                if not self.can_retry:
                    raise
                if isinstance(exc, torch.cuda.OutOfMemoryError) and self.votes:
                    collectives.vote_oom(True)  # pairs with the others' next vote: all leave this batch
                if state.micro >= x.shape[0]:
                    raise
                state.micro *= 2
                self._restore_batch_start(saved)
                if self.on_cuda:
                    torch.cuda.empty_cache()
                who = "this rank" if isinstance(exc, torch.cuda.OutOfMemoryError) else "another rank"
                self.console.line(f"CUDA out of memory on {who}: splitting each batch into {state.micro} micro-batches")

    def _chunks(self, x: torch.Tensor, state: TrainState, closing: bool, window: int, rows) -> dict:
        models, opts, objective = self.models, self.opts, self.objective
        sums: dict = {}
        adv = objective.losses.adv
        train_disc = opts.disc is not None and adv.active(state.global_step)  # from disc_start
        adversarial = models.discriminator is not None and adv.generator_active(state.global_step) and opts.vae is not None
        sizes = chunk_sizes(x.shape[0], state.micro)
        row_chunks = rows.split(sizes) if rows is not None else [None] * len(sizes)
        for i, (chunk, chunk_rows) in enumerate(zip(x.split(sizes), row_chunks)):
            final = closing and i == len(sizes) - 1  # the last backward before the optimizer step
            scale = chunk.shape[0] / (x.shape[0] * window)
            with self._noise(state, chunk_rows):
                if opts.vae is not None:
                    with _frozen(models.discriminator):  # G's loss must not leave gradients in D's parameters
                        loss, recon, logs = objective.generator(models.model, models.discriminator, chunk,
                                                                state.global_step, adversarial, opts.scaler.scale)
                    loss = self._checked(loss, state)
                    if self.faults is not None:
                        self.faults.out_of_memory(state)
                    if final:
                        self.reducers["vae"].arm()
                    opts.scaler.scale(loss * scale).backward()
                else:
                    with torch.no_grad(), objective.devices.autocast():
                        recon = models.model.ae_forward(chunk, sample_posterior=True).recon.float()
                    logs = {}
                    if self.faults is not None:
                        self.faults.out_of_memory(state)
            if train_disc:
                d_loss, d_raw = objective.discriminator(models.discriminator, chunk, recon)
                d_loss = self._checked(d_loss, state)
                if final:
                    self.reducers["disc"].arm()
                opts.scaler.scale(d_loss * scale).backward()
                logs["d_loss"] = d_raw
            for k, v in logs.items():  # weighted by the chunk's images; tensors stay on the device
                sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) * chunk.shape[0]
        # Per-chunk values averaged over images, still as tensors: converted once per log line.
        return {k: v / x.shape[0] for k, v in sums.items()}

    def _noise(self, state: TrainState, rows):
        if self.noise is None or rows is None:
            return nullcontext()
        return self.noise.for_rows(state.epoch, rows)

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

    # ------------------------------------------------------------------ out-of-memory retry
    def _save_batch_start(self, state: TrainState) -> dict:
        mid_window = state.batch % self.accum != 0  # earlier batches of the window left gradients
        lecam = self.models.lecam
        return {
            "grads": [None if p.grad is None else p.grad.clone() for p in self._vae + self._disc] if mid_window else None,
            "norms": [b.clone() for b in self.norm_buffers],
            "quantizers": [q.pending_mark() for q in self.quantizers],
            "lecam": lecam.pending_mark() if lecam is not None else None,
            "rng": (torch.get_rng_state(), torch.cuda.get_rng_state_all() if self.on_cuda else None),
        }

    def _restore_batch_start(self, saved: dict) -> None:
        for reducer in self.reducers.values():
            reducer.abort()
        params = self._vae + self._disc
        for p, g in zip(params, saved["grads"] or [None] * len(params)):
            p.grad = g
        for b, v in zip(self.norm_buffers, saved["norms"]):
            b.copy_(v)
        for q, mark in zip(self.quantizers, saved["quantizers"]):
            q.truncate_pending(mark)
        if self.models.lecam is not None:
            self.models.lecam.truncate_pending(saved["lecam"])
        cpu, cuda = saved["rng"]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    # ------------------------------------------------------------------ the optimizer step
    def optimizer_step(self, state: TrainState) -> str | None:
        """Average gradients over ranks; unless the guard finds the window non-finite (then
        returns its reason and drops the gradients), clip, step, update the EMA and LeCAM.
        Only optimizers whose parameters received gradients step (the discriminator's before
        disc_start has none, and GradScaler refuses an optimizer with no inf checks)."""
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
            stepping = [(opt, params) for opt, params, _ in groups if any(p.grad is not None for p in params)]
            for opt, params in stepping:
                if clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, clip)
                scaler.step(opt)
            if stepping:
                scaler.update()
            self.dist.broadcast_norm_buffers(models.model)  # BatchNorm statistics follow rank 0
            self.dist.broadcast_norm_buffers(models.discriminator)
        for opt, _, _ in groups:
            opt.zero_grad(set_to_none=True)
        if reason is not None:
            if models.lecam is not None:
                models.lecam.discard()
            for q in self.quantizers:
                q.discard_ema()
            return reason
        for q in self.quantizers:
            q.commit_ema()  # before the weight EMA, which copies buffers
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
