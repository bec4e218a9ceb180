"""Tiny in-process stage trainers for the invariant tests: every model family on 8 px digits.

`trainer(family, **step)` builds the real `StageTrainer` (the code a stage runs), on a
small in-memory split, so a test can drive its `train_step` batch by batch and read the
gradients it leaves.
"""

from __future__ import annotations

import numpy as np
import torch
import yaml

from support import TINY
from vaeflow import config as cfg
from vaeflow.preflight import check_code_level

BACKBONE = dict(in_channels=1, resolution=8, base_ch=8, ch_mult=[1, 2], num_res_blocks=1, norm_groups=4)
FAMILIES = {
    "kl": dict(type="autoencoder_kl", embed_dim=2, z_channels=2, attn_resolutions=[], **BACKBONE),
    # EMA codebook with dead-code restarts (threshold 1: every code restarts at the first step)
    "vq": dict(type="vqvae", codebook_size=16, embed_dim=4, **BACKBONE),
    "lfq": dict(type="magvit", quantizer="lfq", codebook_size=16, entropy_weight=0.0, **BACKBONE),
    "fsq": dict(type="magvit", quantizer="fsq", levels=[5, 5, 3], **BACKBONE),
    "cnn_bn": dict(type="cnn_vae", preset="mnist", image_size=8, hidden_dims=[8, 16], latent_dim=6),
    # the same without BatchNorm: a unit-range (BCE) model for the batch-splitting properties
    "cnn": dict(type="cnn_vae", preset="mnist", image_size=8, hidden_dims=[8, 16], latent_dim=6, batchnorm=False),
}
WITHOUT_BATCHNORM = ("kl", "vq", "lfq", "fsq", "cnn")


class Digits(torch.utils.data.Dataset):
    """scikit-learn's 8x8 digits in [0, 1] (the default data set), n items."""

    def __init__(self, n: int, offset: int = 0):
        from sklearn.datasets import load_digits

        images = load_digits().images[offset : offset + n].astype(np.float32) / 16.0
        self.x = torch.from_numpy(images)[:, None]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def config(family: str, **step) -> dict:
    raw = yaml.safe_load(TINY.read_text())
    raw["model"] = dict(FAMILIES[family])
    if family.startswith("cnn"):
        step.setdefault("recon_type", "bce")
    raw["training"]["pipeline"]["steps"] = [{"name": "s", "n_epochs": 1, **step}]
    config = cfg.validate(raw)
    check_code_level(config)
    return config


def trainer(tmp_path, family: str, n_train: int = 40, batch_size: int | None = None, training: dict | None = None,
            **step):
    """A StageTrainer of one stage `s` with these step options (`training`: training.* keys)."""
    from vaeflow.trainer.stage import StageTrainer

    c = config(family, **step)
    c["training"].update(training or {})
    if batch_size:
        c["training"]["batch_size"] = batch_size
    return StageTrainer(c, "s", tmp_path, Digits(n_train), Digits(16, offset=n_train))


def batch(t, n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(dataset rows, images in the model's range) of items start..start+n-1."""
    from vaeflow.metrics import to_model_range

    rows = torch.arange(start, start + n)
    return rows, to_model_range(t.train_data.fetch(rows), t.models.model)


def grads(t) -> dict[str, torch.Tensor]:
    named = list(t.models.model.named_parameters())
    if t.models.discriminator is not None:
        named += [("D." + n, p) for n, p in t.models.discriminator.named_parameters()]
    out = {n: p.grad.clone() for n, p in named if p.grad is not None}
    for _, p in named:
        p.grad = None
    for q in t.train_step.quantizers:
        q.discard_ema()
    if t.models.lecam is not None:
        t.models.lecam.discard()
    return out


def assert_close(a: dict, b: dict, rtol: float = 1e-5, what: str = "") -> None:
    """Per tensor, ||a - b|| <= rtol * ||b||, with a floor of 1e-6 of the whole gradient's norm:
    a gradient that is zero in exact arithmetic (attention's key bias) is float noise only."""
    assert a.keys() == b.keys(), f"{what}: gradients of {sorted(a.keys() ^ b.keys())} only on one side"
    assert a, f"{what}: no gradients at all"
    total = float(sum(v.double().norm() ** 2 for v in b.values()) ** 0.5)
    errors = {k: float((a[k].double() - b[k].double()).norm()) / max(float(b[k].double().norm()), 1e-6 * total / rtol)
              for k in a}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{what}: {worst} differs by {errors[worst]:.2e} (relative, allowed {rtol:g})"


def all_tensors(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every parameter and buffer, by name, cloned."""
    return {prefix + k: v.detach().clone() for k, v in module.state_dict().items()}
