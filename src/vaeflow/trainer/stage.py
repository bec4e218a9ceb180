"""One training stage, read top to bottom: set up, resume, train epochs, publish.

Files of stage `s` under the results directory:
  s/best.pt, s/last.pt, s/metrics.jsonl   published only when the stage completes
  s/running/                              work in progress: resume state (last.pt,
                                          best.pt, metrics.jsonl); undeclared to both
                                          runners, so neither deletes it after a kill
  s/samples/recon|gen/                    fixed-sample grids, one per epoch
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from vaeflow import checkpoint as ckpt
from vaeflow.config import fingerprint, resolve_steps, stage_index, stage_names, stage_view
from vaeflow.losses import AdversarialLoss, KLLoss, PerceptualLoss, ReconstructionLoss, total_correlation
from vaeflow.trainer import rng
from vaeflow.trainer.batches import BatchFetcher, batches_per_epoch, epoch_order
from vaeflow.trainer.device import resolve_device
from vaeflow.trainer.distributed import Dist, init_from_env
from vaeflow.trainer.ema import EMA
from vaeflow.trainer.optim import build_optimizer, build_scheduler

N_FIXED_SAMPLES = 20  # the same validation images in every grid (seed 000)


@dataclass
class StagePaths:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)
        self.running = self.root / "running"
        self.samples = self.root / "samples"

    def final(self, name: str) -> Path:
        return self.root / name

    def work(self, name: str) -> Path:
        return self.running / name


def prior_artifact(config: dict, stage: str, results_dir: str | Path) -> Path | None:
    """The checkpoint a stage starts from: the previous stage's best.pt."""
    i = stage_index(config, stage)
    return None if i == 0 else Path(results_dir) / stage_names(config)[i - 1] / "best.pt"


def _as_channels(dataset) -> int:
    item = dataset[0]
    return (item[0] if isinstance(item, (tuple, list)) else item).shape[0]


def _to_model_range(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return x * 2 - 1 if getattr(model, "input_range", "signed") == "signed" else x


def _to_unit(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1) if getattr(model, "input_range", "signed") == "signed" else x.clamp(0, 1)


class _Console:
    """Seed 003's log line, plus a tqdm bar when stderr is a terminal."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stdout
        self.bar = None
        self.enabled = enabled  # off on ranks other than 0

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        msg = f"[{datetime.now():%H:%M:%S}] {text}"
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, file=self.stream, flush=True)

    def start_bar(self, total: int, initial: int, desc: str) -> None:
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class _Meter:
    sums: dict = field(default_factory=dict)
    count: int = 0

    def add(self, values: dict) -> None:
        """Values may be 0-d tensors: they stay on the device until `means()`, so the
        training loop does not wait for the GPU after every batch."""
        self.count += 1
        for k, v in values.items():
            v = v.detach() if torch.is_tensor(v) else v
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self) -> dict:
        return {k: float(v) / max(1, self.count) for k, v in self.sums.items()}


class StageTrainer:
    """Trains one stage of the pipeline. `run()` returns the stage summary."""

    def __init__(self, config: dict, stage: str, results_dir, train_ds, val_ds, console: _Console | None = None):
        from vaeflow.models import build_discriminator, build_model

        self.config, self.stage = config, stage
        self.index = stage_index(config, stage)
        self.n_stages = len(stage_names(config))
        self.step = resolve_steps(config)[self.index]
        self.tcfg = config["training"]
        self.paths = StagePaths(Path(results_dir) / stage)
        self.dist = Dist()
        self.console = console or _Console(enabled=self.dist.main)
        self.seed = config["seed"]
        rng.seed_everything(self.seed + self.index)  # the same on every rank: identical initial weights

        self.device = resolve_device(self.tcfg["device"])
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.dist.set_device(self.device)  # collective tensors live on the training device
        self.disc_device = resolve_device(self.tcfg.get("disc_device"), self.device)
        self.perc_device = resolve_device(self.tcfg.get("perceptual_device"), self.device)
        self.amp_dtype = None
        if self.step["use_amp"]:
            if self.device.type == "cuda":
                self.amp_dtype = torch.bfloat16 if self.step["amp_dtype"] == "bf16" else torch.float16
            else:
                self.console.line(f"use_amp: AMP is off on {self.device.type}; training in fp32")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.spatial_dims = config["data"].get("spatial_dims", 2)
        self.train_data = BatchFetcher(train_ds, self.tcfg["workers"], config["data"].get("image_size"), self.spatial_dims)
        self.val_data = BatchFetcher(val_ds, 0, config["data"].get("image_size"), self.spatial_dims)
        if len(self.train_data) == 0 or len(self.val_data) == 0:
            raise ValueError(f"stage {stage}: the train and validation splits must not be empty")

        # Models: the autoencoder starts from the prior artifact (previous stage's best.pt).
        with warnings.catch_warnings():  # its "starts from scratch" warning: we say what happens below
            warnings.simplefilter("ignore")
            self.model = build_model(config["model"]).to(self.device)
        self.init_path = prior_artifact(config, stage, results_dir)
        prior = None
        if self.init_path is not None:
            prior = ckpt.load_vaeflow(self.init_path)
            self.model.load_state_dict(prior["ema"] if prior.get("ema") is not None else prior["model"])
            self.console.line(f"Stage {stage} starts from {self.init_path} (its EMA weights)")
        elif config["model"].get("ckpt_path"):
            self.console.line(f"Stage {stage} starts from model.ckpt_path {config['model']['ckpt_path']}")
        else:
            self.console.line(f"Stage {stage} starts from scratch (random initialisation)")
        self.ema = EMA(self.model, self.tcfg["ema_decay"]) if self.tcfg["ema_decay"] > 0 else None

        self.discriminator = None
        if self.step["gan_training"]:
            in_ch = _as_channels(train_ds)  # the discriminator sees images shaped like the data
            self.discriminator = build_discriminator(config["discriminator"], in_ch, self.spatial_dims).to(self.disc_device)
            if prior is not None and prior.get("discriminator") is not None:
                self.discriminator.load_state_dict(prior["discriminator"])
            self._check_discriminator_fits(train_ds)

        self._apply_freeze()

        # Losses.
        s = self.step
        self.recon_loss = ReconstructionLoss(s["recon_type"], s["focal_gamma"], signed=self.model.input_range == "signed")
        self.kl_loss = KLLoss(s["kl_beta"], s["kl_warmup_steps"], s["kl_free_bits"], s["beta_start"], s["beta_end"], s["beta_steps"])
        self.adv_loss = AdversarialLoss(s["lambda_adv"], s["disc_start"], s["r1_gamma"], s["adaptive_weight"], s["adaptive_weight_max"])
        self.perceptual = None
        if s["use_lpips"]:
            random_backbone = os.environ.get("VAEFLOW_LPIPS_RANDOM_BACKBONE") == "1"
            if random_backbone:
                self.console.line("WARNING: VAEFLOW_LPIPS_RANDOM_BACKBONE=1: LPIPS uses a RANDOM backbone (tests only)")
            self.perceptual = PerceptualLoss(s["lpips_net"], pretrained_backbone=not random_backbone).to(self.perc_device)

        # Optimizers and schedulers.
        opt_cfg = s["optimization"]
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable and s["train_vae"]:
            raise ValueError(f"stage {stage}: every autoencoder part is frozen but train_vae is true")
        self.opt_vae = build_optimizer(trainable, opt_cfg["optimizers"]["vae"]) if trainable else None
        self.opt_disc = None
        if self.discriminator is not None and "discriminator" not in self.frozen:
            self.opt_disc = build_optimizer(self.discriminator.parameters(), opt_cfg["optimizers"]["discriminator"])
        scheds = opt_cfg.get("schedulers") or {}
        total_epochs = self._max_epochs()
        self.sched_vae = build_scheduler(self.opt_vae, scheds.get("vae"), total_epochs) if self.opt_vae else None
        self.sched_disc = build_scheduler(self.opt_disc, scheds.get("discriminator"), total_epochs) if self.opt_disc else None
        # Gradient averaging over ranks, overlapped with backward (no-ops single-process).
        self.reducers = {"vae": self.dist.reducer(trainable), "disc": self.dist.reducer(self._disc_params())}

        self.batch_size = self.tcfg["batch_size"]
        self.n_batches = batches_per_epoch(len(self.train_data), self.batch_size, s["max_steps"])
        self.accum = s["grad_accum_steps"]
        self.micro = 1  # chunks per batch; doubled on CUDA out-of-memory
        self.dataset_size = len(self.train_data)

        # Progress state (all of it goes into checkpoints).
        self.epoch, self.batch, self.global_step = 0, 0, 0
        self.best_val = math.inf
        self.history: dict[str, list] = {}
        self.smoothed: float | None = None
        self.finished = False
        self.metrics_offset = 0
        self.run_fingerprint = fingerprint(
            {"view": stage_view(config, stage), "init": ckpt.file_digest(self.init_path) if self.init_path else None}
        )
        self.session_id = datetime.now().strftime("%Y%m%d_%H%M%S")
        self.fixed_val = self.val_data.fetch(torch.arange(min(N_FIXED_SAMPLES, len(self.val_data))))
        g = torch.Generator().manual_seed(self.seed + 7919)
        self.fixed_noise = self._prior_noise(N_FIXED_SAMPLES, g)
        if self.dist.enabled:
            self.dist.broadcast_module(self.model)
            self.dist.broadcast_module(self.discriminator)
            if self.ema is not None:
                self.dist.broadcast_module(self.ema.model)
            if self.dist.rank:  # other ranks draw their own posterior noise; rank 0 keeps the single-process stream
                rng.seed_everything(self.seed + self.index + 104_729 * self.dist.rank)
            self.console.line(f"Data parallel over {self.dist.world} processes: {self.batch_size // self.dist.world} images each per batch")

    # ------------------------------------------------------------------ setup helpers
    def _max_epochs(self) -> int:
        t = self.step["transition_on"]
        return t["max_epochs"] if t.get("mode") == "loss_threshold" else self.step["n_epochs"]

    def _apply_freeze(self) -> None:
        self.frozen = set(self.step["freeze"]) - set(self.step["unfreeze"])
        parts = self.model.parts()
        for name in self.frozen - {"discriminator"}:
            if name not in parts:
                raise ValueError(f"stage {self.stage}: freeze names {name!r}, which this model has not (parts: {', '.join(parts)})")
            for module in parts[name]:
                module.requires_grad_(False)
        if self.discriminator is not None and "discriminator" in self.frozen:
            self.discriminator.requires_grad_(False)

    def _check_discriminator_fits(self, dataset) -> None:
        """A PatchGAN too deep for the image size fails inside conv; say which key to change."""
        item = dataset[0]
        x = (item[0] if isinstance(item, (tuple, list)) else item)[None].float().to(self.disc_device)
        try:
            with torch.no_grad():
                self.discriminator.eval()(x)
        except (RuntimeError, ValueError) as exc:  # conv kernel or norm larger than what is left
            from vaeflow.config import ConfigError

            raise ConfigError(
                "discriminator.n_layers",
                f"{self.config['discriminator']['n_layers']} layers are too deep for images of shape "
                f"{tuple(x.shape[1:])}; use fewer ({exc})",
            ) from None
        finally:
            self.discriminator.train()

    def _prior_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if hasattr(self.model, "sample_prior"):
            return self.model.sample_prior(n, generator=generator).cpu()
        return torch.randn((n, *self.model.latent_shape), generator=generator)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    # ------------------------------------------------------------------ the losses of one chunk
    def _generator_losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        s = self.step
        with self._autocast():
            out = self.model.ae_forward(x, sample_posterior=True)
        recon = out.recon.float()
        logs: dict[str, float] = {}
        loss = torch.zeros((), device=x.device)
        nll = None
        if s["train_vae"]:
            nll = self.recon_loss(recon, x)
            logs["recon_loss"] = nll.detach()
            if self.perceptual is not None:
                p = self.perceptual(recon.to(self.perc_device), x.to(self.perc_device)).to(x.device)
                logs["lpips_loss"] = p.detach()
                nll = nll + s["lambda_lpips"] * p
            loss = loss + nll
        if out.posterior is not None:
            kl, kl_raw = self.kl_loss(out.posterior.mean, out.posterior.logvar)
            beta = self.kl_loss.beta(self.global_step)
            loss = loss + beta * kl
            logs["kl_loss"], logs["beta"] = kl_raw, beta
            if s["tc_weight"] > 0:
                z = out.posterior.sample()
                tc = total_correlation(z, out.posterior.mean, out.posterior.logvar, self.dataset_size)
                loss = loss + s["tc_weight"] * tc
                logs["tc_loss"] = tc.detach()
        if out.reg_loss is not None:
            loss = loss + s["lambda_vq"] * out.reg_loss
            logs["vq_loss"] = out.reg_loss.detach()
        for k, v in (out.stats or {}).items():
            logs[k] = v
        if self.discriminator is not None and self.adv_loss.active(self.global_step) and not self._vae_frozen():
            last = self.model.last_layer_weight() if s["train_vae"] else None
            adv, g_raw, w = self.adv_loss.generator(self.discriminator, recon.to(self.disc_device), nll, last)
            loss = loss + adv.to(x.device)
            logs["g_loss"], logs["adv_weight"] = g_raw, w.detach()
        logs["vae_loss"] = loss.detach()
        return loss, recon.detach(), logs

    def _vae_frozen(self) -> bool:
        return self.opt_vae is None

    # ------------------------------------------------------------------ one batch
    def _train_batch(self, x: torch.Tensor, window_pos: int) -> dict:
        while True:
            try:
                return self._train_batch_chunks(x, window_pos)
            except torch.cuda.OutOfMemoryError:
                if not self.step["allow_microbatching"] or self.micro >= x.shape[0]:
                    raise
                self.micro *= 2
                self._restore_grads()
                torch.cuda.empty_cache()
                self.console.line(f"CUDA out of memory: splitting each batch into {self.micro} micro-batches")

    def _restore_grads(self) -> None:
        for group, snap in ((self._vae_params(), self._snap_vae), (self._disc_params(), self._snap_disc)):
            for p, g in zip(group, snap or [None] * len(group)):
                p.grad = None if g is None else g.clone()

    def _vae_params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def _disc_params(self):
        return list(self.discriminator.parameters()) if self.opt_disc is not None else []

    def _train_batch_chunks(self, x: torch.Tensor, window_pos: int) -> dict:
        # Keep the window's gradients so an OOM retry can start this batch over.
        on_cuda = self.device.type == "cuda" and self.step["allow_microbatching"]
        self._snap_vae = [None if p.grad is None else p.grad.clone() for p in self._vae_params()] if on_cuda and window_pos else None
        self._snap_disc = [None if p.grad is None else p.grad.clone() for p in self._disc_params()] if on_cuda and window_pos else None
        meter = _Meter()
        scale = 1.0 / (self.micro * self.accum)
        train_disc = self.opt_disc is not None and self.adv_loss.active(self.global_step)
        chunks = x.chunk(self.micro)
        closing = (self.batch + 1) % self.accum == 0 or self.batch + 1 == self.n_batches
        for i, chunk in enumerate(chunks):
            final = closing and i == len(chunks) - 1  # the last backward before the optimizer step
            if self.opt_vae is not None:
                loss, recon, logs = self._generator_losses(chunk)
                if final:
                    self.reducers["vae"].arm()
                self.scaler.scale(loss * scale).backward()
            else:
                with torch.no_grad(), self._autocast():
                    recon = self.model.ae_forward(chunk, sample_posterior=True).recon.float()
                logs = {}
            if train_disc:
                with self._autocast():
                    d_loss, d_raw = self.adv_loss.discriminator(self.discriminator, chunk.to(self.disc_device), recon.to(self.disc_device))
                if final:
                    self.reducers["disc"].arm()
                self.scaler.scale(d_loss * scale).backward()
                logs["d_loss"] = d_raw
            meter.add(logs)
        # Per-chunk values averaged, still as tensors: converted once per log line.
        return {k: v / meter.count for k, v in meter.sums.items()}

    def _optimizer_step(self) -> None:
        clip = self.step["grad_clip"]
        for opt, params, part in ((self.opt_vae, self._vae_params, "vae"), (self.opt_disc, self._disc_params, "disc")):
            if opt is None:
                continue
            self.reducers[part].finish()  # before unscaling: an inf on any rank skips the step on all
            if clip:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params(), clip)
            self.scaler.step(opt)
        self.scaler.update()
        self.dist.broadcast_norm_buffers(self.model)  # BatchNorm statistics follow rank 0
        self.dist.broadcast_norm_buffers(self.discriminator)
        for opt in (self.opt_vae, self.opt_disc):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        if self.ema is not None and self.opt_vae is not None:
            self.ema.update(self.model)

    # ------------------------------------------------------------------ validation and samples
    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    @torch.no_grad()
    def validate(self) -> dict:
        model = self.eval_model()
        was_training = model.training
        model.eval()
        meter = _Meter()
        beta = self.kl_loss.beta(10**12)  # the schedule's final weight, so epochs compare
        n = len(self.val_data)
        order = torch.arange(n)
        bs = self.config["evaluation"]["batch_size"]
        for start in range(0, n, bs):
            x = _to_model_range(self.val_data.fetch(order[start : start + bs]), model).to(self.device)
            out = model.ae_forward(x, sample_posterior=False)
            rec = self.recon_loss(out.recon.float(), x)
            vals = {"val_recon": rec}
            loss = rec
            if out.posterior is not None:
                kl = self.kl_loss.forward(out.posterior.mean, out.posterior.logvar)[1]
                vals["val_kl"] = kl
                loss = loss + beta * kl
            if out.reg_loss is not None:
                loss = loss + self.step["lambda_vq"] * out.reg_loss
            vals["val_loss"] = loss
            weight = x.shape[0]
            for k, v in vals.items():  # weighted by batch size: a mean over images
                meter.sums[k] = meter.sums.get(k, 0.0) + float(v) * weight
            meter.count += weight
        model.train(was_training)
        return meter.means()

    @torch.no_grad()
    def save_grids(self) -> None:
        from torchvision.utils import save_image

        model = self.eval_model()
        was_training = model.training
        model.eval()
        x = _to_model_range(self.fixed_val, model).to(self.device)
        recon = _to_unit(model.ae_forward(x, sample_posterior=False).recon.float(), model).cpu()
        gen = _to_unit(model.decode_latent(self.fixed_noise.to(self.device)).float(), model).cpu()
        model.train(was_training)
        if self.spatial_dims == 3:  # show the middle slice of each volume
            mid = self.fixed_val.shape[2] // 2
            originals, recon, gen = self.fixed_val[:, :, mid], recon[:, :, mid], gen[:, :, mid]
        else:
            originals = self.fixed_val
        tag = f"{self.stage}_{self.index + 1:03d}_{self.epoch + 1:03d}_{self.run_fingerprint[:6]}"
        for sub, name, imgs in (("recon", "original", originals), ("recon", "nr_o", recon), ("gen", "gen", gen)):
            out = self.paths.samples / sub / f"{tag}-{name}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write(out, lambda f, imgs=imgs: save_image(imgs, f, nrow=5, format="png"))

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {
            "format": ckpt.FORMAT,
            "config": self.config,
            "stage": self.stage,
            "stage_index": self.index,
            "fingerprint": self.run_fingerprint,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict()["weights"] if self.ema is not None else None,
            "ema_state": {"num_updates": self.ema.num_updates} if self.ema is not None else None,
            "discriminator": self.discriminator.state_dict() if self.discriminator is not None else None,
            "optimizers": {k: o.state_dict() for k, o in (("vae", self.opt_vae), ("discriminator", self.opt_disc)) if o},
            "schedulers": {k: s.state_dict() for k, s in (("vae", self.sched_vae), ("discriminator", self.sched_disc)) if s},
            "scaler": self.scaler.state_dict(),
            "rng": rng.capture(),
            "rng_ranks": self.dist.gather(rng.capture()) if self.dist.enabled else None,
            "data_state": {"epoch": self.epoch, "batch": self.batch, "micro": self.micro},
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_val": self.best_val,
            "smoothed": self.smoothed,
            "finished": self.finished,
            "metrics_offset": self.metrics_offset,
            "pipeline_metadata": {
                "current_step": self.index,
                "current_step_name": self.stage,
                "total_steps": self.n_stages,
                "current_step_epoch": self.epoch,
                "batch": self.batch,
                "global_step": self.global_step,
                "step_metrics": {self.stage: self.history},
            },
        }

    def load_state(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        if self.ema is not None:
            self.ema.load_state_dict({"weights": st["ema"], "num_updates": st["ema_state"]["num_updates"]})
        if self.discriminator is not None:
            self.discriminator.load_state_dict(st["discriminator"])
        for key, opt in (("vae", self.opt_vae), ("discriminator", self.opt_disc)):
            if opt is not None:
                opt.load_state_dict(st["optimizers"][key])
        for key, sch in (("vae", self.sched_vae), ("discriminator", self.sched_disc)):
            if sch is not None:
                sch.load_state_dict(st["schedulers"][key])
        self.scaler.load_state_dict(st["scaler"])
        ranks = st.get("rng_ranks")
        if self.dist.enabled and ranks and len(ranks) == self.dist.world:
            rng.restore(ranks[self.dist.rank])
        elif not self.dist.enabled:
            rng.restore(st["rng"])
        self.epoch, self.batch = st["data_state"]["epoch"], st["data_state"]["batch"]
        self.micro = st["data_state"]["micro"]
        self.global_step, self.best_val, self.smoothed = st["global_step"], st["best_val"], st["smoothed"]
        self.finished, self.metrics_offset = st["finished"], st["metrics_offset"]
        self.history = st["pipeline_metadata"]["step_metrics"][self.stage]

    def _save(self, name: str) -> None:
        state = self.state()  # every rank: it gathers their RNG states
        if self.dist.main:
            with self.dist.rank_local("rank 0's checkpoint writing"):
                ckpt.save(state, self.paths.work(name))

    def _save_last(self) -> None:
        self.metrics_offset = self._metrics_size()
        self._save("last.pt")

    def _metrics_size(self) -> int:
        p = self.paths.work("metrics.jsonl")
        return p.stat().st_size if p.exists() else 0

    def _try_resume(self) -> None:
        self.dist.barrier()
        self._resume_checked()
        self.dist.barrier()
        self.dist.check_agree("the resume point (epoch, batch, step)", (self.epoch, self.batch, self.global_step))

    def _drop_running(self) -> None:
        if self.dist.main and self.paths.running.exists():
            shutil.rmtree(self.paths.running)

    def _resume_checked(self) -> None:
        last = self.paths.work("last.pt")
        if not last.exists():
            self._drop_running()
            return
        try:
            st = ckpt.load_vaeflow(last)
        except ckpt.CheckpointError as exc:
            self.console.line(f"WARNING: ignoring unreadable resume state ({exc}); starting the stage over")
            self._drop_running()
            return
        if st.get("fingerprint") != self.run_fingerprint:
            self.console.line("Discarding resume state from an earlier run: the stage's config or prior artifact changed")
            self._drop_running()
            return
        self.load_state(st)
        # Drop metric lines written after that checkpoint: they will be written again.
        if self.dist.main:
            with open(self.paths.work("metrics.jsonl"), "a+b") as f:
                f.truncate(self.metrics_offset)
        self.console.line(
            f"Resuming from checkpoint: step={self.index + 1} ({self.stage}), epoch={self.epoch + 1}, batch={self.batch}"
        )

    def _publish(self) -> None:
        """Hard-link the finished files into place, then drop the work dir.

        Links keep running/ whole until every output is in place, so a kill during
        publishing just publishes again on the next run.
        """
        self.dist.barrier()
        if not self.dist.main:
            return
        for name in ("metrics.jsonl", "last.pt", "best.pt"):
            tmp = self.paths.root / f".{name}.publish"
            tmp.unlink(missing_ok=True)
            os.link(self.paths.work(name), tmp)
            os.replace(tmp, self.paths.final(name))
        shutil.rmtree(self.paths.running)

    # ------------------------------------------------------------------ logging
    def _log(self, values: dict, batch_time: float, imgs_per_s: float) -> None:
        s = self.step
        parts = [
            f"Step {self.stage} ({self.index + 1}/{self.n_stages})",
            f"Epoch {self.epoch + 1}/{self._max_epochs()}",
            f"Batch {self.batch}/{self.n_batches}",
            f"VAE: {values.get('vae_loss', 0.0):.4f}",
        ]
        if "kl_loss" in values:
            parts.append(f"KL: {values['kl_loss']:.2f}")
        if "vq_loss" in values:
            parts.append(f"VQ: {values['vq_loss']:.4f}")
        if s["gan_training"]:
            parts += [f"G: {values.get('g_loss', 0.0):.3f}", f"D: {values.get('d_loss', 0.0):.3f}"]
        if s["use_lpips"]:
            parts.append(f"LPIPS: {values.get('lpips_loss', 0.0):.4f}")
        parts += [f"{batch_time:.2f}s/batch", f"{imgs_per_s:.0f} img/s"]
        self.console.line(" | ".join(parts))
        self._write_jsonl({"split": "train", "metrics": values})

    def _write_jsonl(self, record: dict) -> None:
        if not self.dist.main:
            return
        record = {
            "timestamp": datetime.now().isoformat(),
            "session_id": self.session_id,
            "stage": self.stage,
            "epoch": self.epoch + 1,
            "batch": self.batch,
            "global_step": self.global_step,
            **record,
        }
        self.paths.running.mkdir(parents=True, exist_ok=True)
        with open(self.paths.work("metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        self._try_resume()
        self.paths.running.mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter()
        images_seen = 0
        max_epochs = self._max_epochs()
        self.model.train()
        if self.discriminator is not None:
            self.discriminator.train()
        while not self.finished:
            order = epoch_order(len(self.train_data), self.seed, self.index, self.epoch)
            self.console.start_bar(self.n_batches, self.batch, f"{self.stage} epoch {self.epoch + 1}")
            meter, epoch_meter = _Meter(), _Meter()
            t_log, imgs_log = time.perf_counter(), 0
            for x in self.train_data.iterate(order, self.batch_size, self.batch, self.n_batches, self.dist.shard):
                x = _to_model_range(x, self.model).to(self.device, non_blocking=True)
                window_pos = self.batch % self.accum
                values = self._train_batch(x, window_pos)
                self.batch += 1
                imgs_log += x.shape[0]
                images_seen += x.shape[0]
                meter.add(values)
                epoch_meter.add(values)
                self.console.tick()
                if self.batch % self.accum and self.batch != self.n_batches:
                    continue
                self._optimizer_step()
                self.global_step += 1
                if self.global_step % self.tcfg["log_every"] == 0 or self.batch == self.n_batches:
                    dt = time.perf_counter() - t_log
                    imgs = imgs_log * self.dist.world
                    self._log(self.dist.mean_dict(meter.means()), dt / max(1, meter.count), imgs / max(dt, 1e-9))
                    meter, t_log, imgs_log = _Meter(), time.perf_counter(), 0
                if self.global_step % self.tcfg["save_every"] == 0 and self.batch != self.n_batches:
                    self._save_last()
            self.console.close_bar()
            self._end_epoch(self.dist.mean_dict(epoch_meter.means()), max_epochs)
        self._publish()
        elapsed = time.perf_counter() - t_start
        summary = {
            "stage": self.stage,
            "epochs": self.epoch,
            "global_step": self.global_step,
            "best_val_loss": self.best_val,
            "seconds": round(elapsed, 2),
            "images_per_s": round(images_seen * self.dist.world / max(elapsed, 1e-9), 1),
        }
        self.console.line(
            f"Stage {self.stage} done: {self.epoch} epochs, {self.global_step} steps, "
            f"best val_loss {self.best_val:.5f}, {elapsed:.1f}s this run ({summary['images_per_s']:.0f} img/s)"
        )
        return summary

    def _end_epoch(self, train_means: dict, max_epochs: int) -> None:
        val = self.validate()
        for k, v in {**train_means, **val}.items():
            self.history.setdefault(k, []).append(v)
        self._write_jsonl({"split": "val", "metrics": val})
        self.console.line(
            f"Step {self.stage} ({self.index + 1}/{self.n_stages}) | Epoch {self.epoch + 1}/{max_epochs} | "
            + " | ".join(f"{k}: {v:.5f}" for k, v in val.items())
        )
        for sch in (self.sched_vae, self.sched_disc):
            if isinstance(sch, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sch.step(val["val_loss"])
            elif sch is not None:
                sch.step()
        if self.tcfg["sample_every_epoch"] and self.dist.main:
            with self.dist.rank_local("rank 0's sample grids"):
                self.save_grids()
        improved = val["val_loss"] < self.best_val
        if improved:
            self.best_val = val["val_loss"]
        self.epoch += 1
        self.batch = 0
        self.finished = self._transition(train_means, val, max_epochs)
        if improved:
            self._save("best.pt")
        self._save_last()

    def _transition(self, train_means: dict, val: dict, max_epochs: int) -> bool:
        t = self.step["transition_on"]
        if t.get("mode", "epoch") == "epoch":
            return self.epoch >= self.step["n_epochs"]
        value = {**train_means, **val}.get(t["metric"])
        if value is not None:
            a = t.get("smoothing", 0.5)
            self.smoothed = value if self.smoothed is None else a * self.smoothed + (1 - a) * value
            if self.smoothed < t["threshold"]:
                self.console.line(f"Transition: smoothed {t['metric']} {self.smoothed:.5f} < {t['threshold']}")
                return True
        if self.epoch >= max_epochs:
            self.console.line(
                f"WARNING: {t['metric']} never fell below {t['threshold']}; stopping at max_epochs={max_epochs}"
            )
            return True
        return False


def run_stage(config: dict, stage: str, results_dir="results", train_ds=None, val_ds=None) -> dict:
    """Train one stage; datasets default to the prepared splits under results/data."""
    created = init_from_env(config["training"]["distributed"])  # False if the caller set one up
    try:
        return _run_stage(config, stage, results_dir, train_ds, val_ds)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _run_stage(config: dict, stage: str, results_dir, train_ds, val_ds) -> dict:
    if train_ds is None or val_ds is None:
        from vaeflow.data import PreparedDataset, check_prepared

        data_dir = Path(results_dir) / "data"
        check_prepared(config["data"], data_dir)
        train_ds = train_ds or PreparedDataset(data_dir, "train", binarize=config["data"]["binarize"], seed=config["seed"])
        val_ds = val_ds or PreparedDataset(data_dir, "val", binarize="none", seed=config["seed"])
    return StageTrainer(config, stage, results_dir, train_ds, val_ds).run()
