"""Builders: everything a stage trains with, made from its config in a fixed order.

The order matters for exact reproducibility: models, the discriminator and a random
LPIPS backbone draw from the global RNG that the stage seeds first.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vaeflow import checkpoint as ckpt
from vaeflow.losses import AdversarialLoss, KLLoss, LeCAM, PerceptualLoss, ReconstructionLoss
from vaeflow.trainer.device import resolve_device
from vaeflow.trainer.ema import EMA
from vaeflow.trainer.optim import build_optimizer, build_scheduler


def first_image(dataset) -> torch.Tensor:
    item = dataset[0]
    return item[0] if isinstance(item, (tuple, list)) else item


def max_epochs(step: dict) -> int:
    t = step["transition_on"]
    return t["max_epochs"] if t.get("mode") == "loss_threshold" else step["n_epochs"]


# ----------------------------------------------------------------------------- devices
@dataclass
class Devices:
    main: torch.device
    disc: torch.device  # the discriminator's
    perc: torch.device  # the LPIPS network's
    amp_dtype: torch.dtype | None  # None: fp32

    def autocast(self):
        return torch.autocast(self.main.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)


def build_devices(tcfg: dict, step: dict, dist, console) -> Devices:
    device = resolve_device(tcfg["device"])
    if dist.enabled and device.type == "cuda":  # % count: a node may show each rank only its own GPU
        device = torch.device("cuda", dist.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.set_device(device)  # collective tensors live on the training device
    # amp_dtype is set once the model exists (vaeflow.trainer.precision sizes it for use_amp: auto)
    return Devices(device, resolve_device(tcfg.get("disc_device"), device),
                   resolve_device(tcfg.get("perceptual_device"), device), None)


# ----------------------------------------------------------------------------- models
@dataclass
class Models:
    model: nn.Module
    ema: EMA | None
    discriminator: nn.Module | None
    frozen: set  # part names frozen in this stage
    init_path: Path | None  # the prior artifact the model started from
    lecam: LeCAM | None = None  # the LeCAM regularizer's running averages (lambda_lecam > 0)
    source: dict | None = None  # provenance["init"]: the pretrained weights (model.ckpt_path) the run began from

    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model


def build_models(config: dict, stage: str, step: dict, devices: Devices, init_path: Path | None,
                 example: torch.Tensor, console) -> Models:
    """The autoencoder (from the prior artifact, else model.ckpt_path, else random), its EMA,
    and the discriminator when the stage trains adversarially; then the stage's freezing."""
    from vaeflow.models import build_discriminator, build_model

    with warnings.catch_warnings():  # its "starts from scratch" warning: we say what happens below
        warnings.simplefilter("ignore")
        model = build_model(config["model"]).to(devices.main)
    prior = None
    source = None
    if init_path is not None:
        prior = ckpt.load_vaeflow(init_path)
        model.load_state_dict(prior["ema"] if prior.get("ema") is not None else prior["model"])
        source = (prior.get("provenance") or {}).get("init")
        console.line(f"Stage {stage} starts from {init_path} (its EMA weights)")
    elif config["model"].get("ckpt_path"):
        from vaeflow.models.pretrained import record

        source = record(config["model"]["ckpt_path"])
        console.line(f"Stage {stage} starts from model.ckpt_path {config['model']['ckpt_path']} "
                     f"({source['kind']}, sha256 {source['sha256'][:12]})")
    else:
        console.line(f"Stage {stage} starts from scratch (random initialisation)")
    decay = config["training"]["ema_decay"]
    ema = EMA(model, decay) if decay > 0 else None

    discriminator = None
    if step["gan_training"]:  # it sees images shaped like the data
        spatial_dims = config["data"].get("spatial_dims", 2)
        discriminator = build_discriminator(config["discriminator"], example.shape[0], spatial_dims).to(devices.disc)
        if prior is not None and prior.get("discriminator") is not None:
            discriminator.load_state_dict(prior["discriminator"])
        check_discriminator_fits(discriminator, example.to(devices.disc), config["discriminator"]["n_layers"])
    lecam = LeCAM().to(devices.disc) if discriminator is not None and step["lambda_lecam"] > 0 else None
    models = Models(model, ema, discriminator, set(step["freeze"]) - set(step["unfreeze"]), init_path, lecam, source)
    apply_freeze(models, stage)
    return models


def apply_freeze(models: Models, stage: str) -> None:
    parts = models.model.parts()
    for name in models.frozen - {"discriminator"}:
        if name not in parts:
            raise ValueError(f"stage {stage}: freeze names {name!r}, which this model has not (parts: {', '.join(parts)})")
        for module in parts[name]:
            module.requires_grad_(False)
    if models.discriminator is not None and "discriminator" in models.frozen:
        models.discriminator.requires_grad_(False)
    apply_modes(models)


def frozen_modules(models: Models) -> list[nn.Module]:
    """The modules of the frozen parts (the discriminator's too, when frozen)."""
    parts = models.model.parts()
    out = [m for name in sorted(models.frozen - {"discriminator"}) for m in parts[name]]
    if models.discriminator is not None and "discriminator" in models.frozen:
        out.append(models.discriminator)
    return out


def apply_modes(models: Models) -> None:
    """Training mode, except frozen parts: those run in eval mode, so nothing of theirs
    changes -- no BatchNorm statistics, no VQ codebook EMA or dead-code restart. A model
    with no trainable parameter at all (a discriminator-only stage) runs wholly in eval."""
    models.model.train()
    if models.discriminator is not None:
        models.discriminator.train()
    for module in frozen_modules(models):
        module.eval()
    if not any(p.requires_grad for p in models.model.parameters()):
        models.model.eval()


def check_discriminator_fits(discriminator: nn.Module, image: torch.Tensor, n_layers: int) -> None:
    """A PatchGAN too deep for the image size fails inside conv; say which key to change."""
    x = image[None].float()
    try:
        with torch.no_grad():
            discriminator.eval()(x)
    except (RuntimeError, ValueError) as exc:  # conv kernel or norm larger than what is left
        from vaeflow.config import ConfigError

        raise ConfigError(
            "discriminator.n_layers",
            f"{n_layers} layers are too deep for images of shape {tuple(x.shape[1:])}; use fewer ({exc})",
        ) from None
    finally:
        discriminator.train()


# ----------------------------------------------------------------------------- losses
@dataclass
class Losses:
    recon: ReconstructionLoss
    kl: KLLoss
    adv: AdversarialLoss
    perceptual: PerceptualLoss | None


def build_losses(step: dict, model: nn.Module, perc_device: torch.device, console, lecam: LeCAM | None = None) -> Losses:
    s = step
    recon = ReconstructionLoss(s["recon_type"], s["focal_gamma"], signed=model.input_range == "signed")
    kl = KLLoss(s["kl_beta"], s["kl_warmup_steps"], s["kl_free_bits"], s["beta_start"], s["beta_end"], s["beta_steps"])
    adv = AdversarialLoss(s["lambda_adv"], s["disc_start"], s["r1_gamma"], s["adaptive_weight"], s["adaptive_weight_max"],
                          s["gan_start"], s["lambda_lecam"], lecam)
    perceptual = None
    if s["use_lpips"]:
        random_backbone = os.environ.get("VAEFLOW_LPIPS_RANDOM_BACKBONE") == "1"
        if random_backbone:
            console.line("WARNING: VAEFLOW_LPIPS_RANDOM_BACKBONE=1: LPIPS uses a RANDOM backbone (tests only)")
        perceptual = PerceptualLoss(s["lpips_net"], pretrained_backbone=not random_backbone,
                                    input_range=model.input_range).to(perc_device)
    return Losses(recon, kl, adv, perceptual)


# ----------------------------------------------------------------------------- optimizers
@dataclass
class Optimizers:
    vae: torch.optim.Optimizer | None  # None: every autoencoder part is frozen
    disc: torch.optim.Optimizer | None  # None: no discriminator, or it is frozen
    sched_vae: object | None
    sched_disc: object | None
    scaler: torch.amp.GradScaler

    def named(self) -> tuple:
        return (("vae", self.vae), ("discriminator", self.disc))

    def named_schedulers(self) -> tuple:
        return (("vae", self.sched_vae), ("discriminator", self.sched_disc))


def build_optimizers(stage: str, step: dict, models: Models, devices: Devices) -> Optimizers:
    opt_cfg = step["optimization"]
    trainable = [p for p in models.model.parameters() if p.requires_grad]
    if not trainable and step["train_vae"]:
        raise ValueError(f"stage {stage}: every autoencoder part is frozen but train_vae is true")
    opt_vae = build_optimizer(trainable, opt_cfg["optimizers"]["vae"]) if trainable else None
    opt_disc = None
    if models.discriminator is not None and "discriminator" not in models.frozen:
        opt_disc = build_optimizer(models.discriminator.parameters(), opt_cfg["optimizers"]["discriminator"])
        for group in opt_disc.param_groups:
            group["lr"] *= step["disc_lr_mult"]
    scheds = opt_cfg.get("schedulers") or {}
    total = max_epochs(step)
    return Optimizers(
        opt_vae,
        opt_disc,
        build_scheduler(opt_vae, scheds.get("vae"), total) if opt_vae else None,
        build_scheduler(opt_disc, scheds.get("discriminator"), total) if opt_disc else None,
        torch.amp.GradScaler("cuda", enabled=devices.amp_dtype == torch.float16),
    )
