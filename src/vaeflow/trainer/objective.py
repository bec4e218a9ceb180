"""The losses of one chunk of a batch: what the autoencoder minimises, what the
discriminator minimises, and the validation loss epochs are compared by."""

from __future__ import annotations

import torch
from torch import nn

from vaeflow.losses import total_correlation
from vaeflow.trainer.build import Devices, Losses


class Objective:
    def __init__(self, step: dict, losses: Losses, devices: Devices, dataset_size: int):
        self.step, self.losses, self.devices = step, losses, devices
        self.dataset_size = dataset_size  # the total-correlation estimator's N

    def generator(self, model: nn.Module, discriminator: nn.Module | None, x: torch.Tensor, global_step: int,
                  adversarial: bool, scale=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(loss, detached reconstruction, logged values); `adversarial` adds the GAN term.

        Precision under autocast: only the autoencoder's forward runs in it; the
        reconstruction loss, KL (losses/kl.py), LPIPS (losses/perceptual.py) and the adaptive
        weight (losses/adversarial.py, with the GradScaler's `scale`) are fp32."""
        s, L = self.step, self.losses
        with self.devices.autocast():
            out = model.ae_forward(x, sample_posterior=True)
        recon = out.recon.float()
        logs: dict = {}
        loss = torch.zeros((), device=x.device)
        nll = None
        if s["train_vae"]:
            nll = self._nll(recon, x, logs)
            loss = loss + nll
        if out.posterior is not None:
            loss = self._add_kl(loss, out.posterior, global_step, logs)
        if out.reg_loss is not None:
            loss = loss + s["lambda_vq"] * out.reg_loss
            logs["vq_loss"] = out.reg_loss.detach()
        for k, v in (out.stats or {}).items():
            logs[k] = v
        if adversarial:
            last = model.last_layer_weight() if s["train_vae"] else None
            adv, g_raw, w = L.adv.generator(discriminator, recon.to(self.devices.disc), nll, last, scale)
            loss = loss + adv.to(x.device)
            logs["g_loss"], logs["adv_weight"] = g_raw, w.detach()
        logs["vae_loss"] = loss.detach()
        return loss, recon.detach(), logs

    def _nll(self, recon: torch.Tensor, x: torch.Tensor, logs: dict) -> torch.Tensor:
        """Reconstruction loss, plus the weighted LPIPS distance when the stage uses it."""
        nll = self.losses.recon(recon, x)
        logs["recon_loss"] = nll.detach()
        if self.losses.perceptual is not None:
            perc = self.devices.perc
            p = self.losses.perceptual(recon.to(perc), x.to(perc)).to(x.device)
            logs["lpips_loss"] = p.detach()
            nll = nll + self.step["lambda_lpips"] * p
        return nll

    def _add_kl(self, loss: torch.Tensor, posterior, global_step: int, logs: dict) -> torch.Tensor:
        """Add the beta-weighted KL to the prior, and the total-correlation penalty (beta-TCVAE)."""
        kl, kl_raw = self.losses.kl(posterior.mean, posterior.logvar)
        beta = self.losses.kl.beta(global_step)
        loss = loss + beta * kl
        logs["kl_loss"], logs["beta"] = kl_raw, beta
        if self.step["tc_weight"] > 0:
            z = posterior.sample()
            tc = total_correlation(z, posterior.mean, posterior.logvar, self.dataset_size)
            loss = loss + self.step["tc_weight"] * tc
            logs["tc_loss"] = tc.detach()
        return loss

    def discriminator(self, discriminator: nn.Module, x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """D's forward passes follow autocast; the R1 penalty and LeCAM are fp32 (losses/)."""
        disc = self.devices.disc
        with self.devices.autocast():
            return self.losses.adv.discriminator(discriminator, x.to(disc), recon.to(disc))

    def validation(self, model: nn.Module, x: torch.Tensor) -> dict:
        """val_recon, val_kl (KL models) and val_loss of one batch, without posterior noise.

        KL is weighted by the schedule's final beta, so epochs compare."""
        out = model.ae_forward(x, sample_posterior=False)
        rec = self.losses.recon(out.recon.float(), x)
        vals = {"val_recon": rec}
        loss = rec
        if out.posterior is not None:
            kl = self.losses.kl.forward(out.posterior.mean, out.posterior.logvar)[1]
            vals["val_kl"] = kl
            loss = loss + self.losses.kl.beta(10**12) * kl
        if out.reg_loss is not None:
            loss = loss + self.step["lambda_vq"] * out.reg_loss
        vals["val_loss"] = loss
        return vals
