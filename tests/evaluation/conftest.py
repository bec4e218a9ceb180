"""Fixtures for evaluation, sampling and report tests: a prepared digits split, small
models of each family (following the autoencoder protocol) and checkpoints of them."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from vaeflow import checkpoint as ckpt
from vaeflow import config as vfconfig
from vaeflow.models.base import AEOutput, Autoencoder, DiagonalGaussian

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


class TinyMLPVAE(Autoencoder):
    """A vector-latent, unit-range (sigmoid / Bernoulli) VAE like the CNN VAE MNIST preset."""

    input_range = "unit"

    def __init__(self, shape=(1, 8, 8), latent=4, hidden=32):
        super().__init__()
        d = math.prod(shape)
        self.shape, self.latent = tuple(shape), latent
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, d))

    def decode_latent(self, z):
        return torch.sigmoid(self.dec(z)).view(-1, *self.shape)

    def ae_forward(self, x, sample_posterior=True):
        mean, logvar = self.enc(x).chunk(2, 1)
        post = DiagonalGaussian(mean=mean, logvar=logvar)
        return AEOutput(self.decode_latent(post.sample() if sample_posterior else post.mode()), post)

    def encode_latent(self, x):
        return self.enc(x).chunk(2, 1)[0]

    @property
    def latent_shape(self):
        return (self.latent,)


class _Quantizer:
    def __init__(self, size):
        self.codebook_size = size


class TinyVQ(Autoencoder):
    """A minimal VQ autoencoder with the VQVAE interface: encode -> (z_q, loss, info{indices})."""

    input_range = "signed"

    def __init__(self, codebook_size=8, dim=2):
        super().__init__()
        self.enc = nn.Conv2d(1, dim, 2, stride=2)
        self.dec = nn.ConvTranspose2d(dim, 1, 2, stride=2)
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim))
        self.quantize = _Quantizer(codebook_size)
        self.dim = dim

    def encode(self, x):
        z = self.enc(x)
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim)
        idx = torch.cdist(flat, self.codebook).argmin(1)
        zq = self.codebook[idx].view(z.shape[0], z.shape[2], z.shape[3], self.dim).permute(0, 3, 1, 2)
        indices = idx.view(z.shape[0], z.shape[2], z.shape[3])
        return zq, (zq - z).pow(2).mean(), {"indices": indices, "perplexity": 1.0, "usage": 0.5}

    def decode_latent(self, z):
        return torch.tanh(self.dec(z))

    def ae_forward(self, x, sample_posterior=True):
        zq, loss, info = self.encode(x)
        return AEOutput(self.decode_latent(zq), None, loss, {k: v for k, v in info.items() if isinstance(v, float)})

    def encode_latent(self, x):
        return self.encode(x)[0]

    @property
    def latent_shape(self):
        return (self.dim, 4, 4)

    def sample_prior(self, n, generator=None):
        idx = torch.randint(0, self.quantize.codebook_size, (n, 4, 4), generator=generator)
        return self.codebook[idx].permute(0, 3, 1, 2)


def tiny_config() -> dict:
    return vfconfig.validate(yaml.safe_load(TINY.read_text()))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """results/ with the tiny config's prepared digits (8x8, 1437/180/180)."""
    from vaeflow.data import prepare_dataset

    root = tmp_path_factory.mktemp("results")
    prepare_dataset(tiny_config()["data"], root / "data")
    return root


def save_checkpoint(results: Path, stage: str, model: nn.Module, config: dict, labels=("best", "last")) -> list[Path]:
    state = {"format": ckpt.FORMAT, "config": config, "stage": stage, "stage_index": 0,
             "model": model.state_dict(), "ema": model.state_dict(), "epoch": 1, "global_step": 3}
    paths = []
    for label in labels:
        p = results / stage / f"{label}.pt"
        ckpt.save(state, p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def kl_run(prepared) -> Path:
    """An untrained tiny AutoencoderKL (spatial 2x4x4 latent) saved as stage `vae_warmup`."""
    from vaeflow.models import build_model

    cfg = tiny_config()
    torch.manual_seed(0)
    with warnings.catch_warnings():  # "starts from scratch": intended
        warnings.simplefilter("ignore")
        model = build_model(cfg["model"])
    save_checkpoint(prepared, "vae_warmup", model, cfg)
    return prepared


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory) -> Path:
    """An UNTRAINED InceptionV3 in torch-fidelity's layout (torchvision's inception_v3 with
    1008 classes has the same keys), for exercising the rFID code path only."""
    import torchvision

    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    torch.save(net.state_dict(), path)
    return path
