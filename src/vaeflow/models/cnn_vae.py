"""Small CNN VAEs with a flat latent vector (MNIST and CelebA presets).

`VAEBase` is the classic VAE interface: subclasses implement `encode(x) -> (mu, logvar)` and
`decode(z)`; the base adds `reparameterize`, `forward -> (recon, mu, logvar)`, `compute_loss`
(recon + beta * KL, summed over pixels / latent dims, averaged over the batch), `sample(n)`,
`reconstruct(x)`, and vaeflow's autoencoder contract (`ae_forward`, `encode_latent`, ...).

`CNNVAE` is the one concrete network, with two presets:

    mnist   1x28x28, hidden_dims (32, 64, 128, 256), latent 128, conv3/s2 encoder, flatten + FC,
            transposed-conv decoder sized back to 28, sigmoid output, BCE, input_range "unit"
    celeba  3x64x64, hidden_dims (32, 64, 128, 256), latent 256, conv4/s2 encoder,
            AdaptiveAvgPool to 4x4 + FC, FC back to 4x4, transposed convs, tanh, MSE, "signed"

Every block is Conv/ConvTranspose + BatchNorm (optional) + LeakyReLU.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import AEOutput, Autoencoder, DiagonalGaussian, load_weights


class VAELoss(NamedTuple):
    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


class VAEBase(Autoencoder):
    """A VAE with a flat latent. Subclasses set `latent_dim` and implement encode/decode."""

    latent_dim: int

    def __init__(self, beta: float = 1.0, recon_loss: str = "mse"):
        super().__init__()
        if recon_loss not in ("mse", "bce"):
            raise ValueError(f"recon_loss must be 'mse' or 'bce', got {recon_loss!r}")
        self.beta = float(beta)
        self.recon_loss = recon_loss

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(self, x: torch.Tensor):
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar

    def compute_loss(self, recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor,
                     logvar: torch.Tensor, beta: float | None = None) -> VAELoss:
        """recon + beta * KL; each term summed per sample, then averaged over the batch."""
        beta = self.beta if beta is None else beta
        if self.recon_loss == "bce":  # autocast bans BCE on probabilities: run it in fp32
            with torch.autocast(device_type=recon.device.type, enabled=False):
                rec = F.binary_cross_entropy(recon.float(), x.float(), reduction="none")
        else:
            rec = F.mse_loss(recon, x, reduction="none")
        rec = rec.flatten(1).sum(1).mean()
        kl = (-0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)).mean()
        return VAELoss(rec + beta * kl, rec, kl)

    def _device_dtype(self):
        p = next(self.parameters())
        return p.device, p.dtype

    @torch.no_grad()
    def sample(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.sample_prior(n, generator=generator).to(
            device or self._device_dtype()[0]))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.encode(x)
        return self.decode(mu)

    # -- vaeflow autoencoder contract --------------------------------------------------------
    def ae_forward(self, x: torch.Tensor, sample_posterior: bool = True) -> AEOutput:
        mu, logvar = self.encode(x)
        posterior = DiagonalGaussian(mean=mu, logvar=logvar)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return AEOutput(recon=self.decode(z), posterior=posterior, reg_loss=None, stats={})

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.latent_dim,)


def _act(slope: float) -> nn.Module:
    return nn.LeakyReLU(slope, inplace=True) if slope > 0 else nn.ReLU(inplace=True)


class ConvBlock(nn.Sequential):
    """Conv2d + (BatchNorm) + LeakyReLU."""

    def __init__(self, cin, cout, k, s, p, batchnorm=True, slope=0.2):
        super().__init__(nn.Conv2d(cin, cout, k, s, p, bias=not batchnorm),
                         nn.BatchNorm2d(cout) if batchnorm else nn.Identity(), _act(slope))


class DeconvBlock(nn.Sequential):
    """ConvTranspose2d + (BatchNorm) + LeakyReLU."""

    def __init__(self, cin, cout, k, s, p, output_padding=0, batchnorm=True, slope=0.2):
        super().__init__(nn.ConvTranspose2d(cin, cout, k, s, p, output_padding=output_padding,
                                            bias=not batchnorm),
                         nn.BatchNorm2d(cout) if batchnorm else nn.Identity(), _act(slope))


PRESETS: dict[str, dict] = {
    "mnist": dict(in_channels=1, image_size=28, hidden_dims=(32, 64, 128, 256), latent_dim=128,
                  kernel_size=3, pool_size=None, output_activation="sigmoid", recon_loss="bce",
                  input_range="unit"),
    "celeba": dict(in_channels=3, image_size=64, hidden_dims=(32, 64, 128, 256), latent_dim=256,
                   kernel_size=4, pool_size=4, output_activation="tanh", recon_loss="mse",
                   input_range="signed"),
}


class CNNVAE(VAEBase):
    """Convolutional VAE with a flat latent.

    Encoder: one stride-2 ConvBlock per `hidden_dims` entry (kernel 3/pad 1 or kernel 4/pad 1),
    then either flatten (`pool_size=None`) or AdaptiveAvgPool to pool_size x pool_size, and two
    linear heads to mu and logvar. Decoder: linear back to the smallest map, stride-2
    DeconvBlocks through the reversed widths (output padding chosen so the sizes retrace the
    encoder's exactly; with pooling, as many doublings as reach `image_size`), and a 3x3 conv to
    `out_channels` with the output activation ("sigmoid", "tanh" or "none").
    """

    def __init__(self, *, in_channels: int = 1, out_channels: int | None = None,
                 image_size: int | Sequence[int] = 28, hidden_dims: Sequence[int] = (32, 64, 128, 256),
                 latent_dim: int = 128, kernel_size: int = 3, pool_size: int | None = None,
                 batchnorm: bool = True, leaky_slope: float = 0.2,
                 output_activation: str = "sigmoid", recon_loss: str = "bce", beta: float = 1.0,
                 input_range: str = "unit", ckpt_path: str | None = None):
        super().__init__(beta=beta, recon_loss=recon_loss)
        if kernel_size not in (3, 4):
            raise ValueError("kernel_size must be 3 or 4")
        if output_activation not in ("sigmoid", "tanh", "none", None):
            raise ValueError(f"output_activation {output_activation!r}")
        if input_range not in ("unit", "signed"):
            raise ValueError(f"input_range must be 'unit' or 'signed', got {input_range!r}")
        if recon_loss == "bce" and output_activation != "sigmoid":
            raise ValueError("recon_loss 'bce' needs output_activation 'sigmoid'")
        out_channels = in_channels if out_channels is None else out_channels
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        hidden_dims = [int(h) for h in hidden_dims]
        self.latent_dim = int(latent_dim)
        self.input_range = input_range
        self.image_size = size
        self.output_activation = output_activation or "none"
        pad = 1
        # encoder, tracking every map size for the decoder
        sizes = [size]
        layers, cin = [], in_channels
        for h in hidden_dims:
            layers.append(ConvBlock(cin, h, kernel_size, 2, pad, batchnorm, leaky_slope))
            cin = h
            sizes.append(tuple((s + 2 * pad - kernel_size) // 2 + 1 for s in sizes[-1]))
        if min(sizes[-1]) < 1:
            raise ValueError(f"image_size {size} is too small for {len(hidden_dims)} downsamplings")
        self.encoder = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool_size) if pool_size else nn.Identity()
        bottom = (pool_size, pool_size) if pool_size else sizes[-1]
        self.bottom = bottom
        flat = hidden_dims[-1] * bottom[0] * bottom[1]
        self.fc_mu = nn.Linear(flat, self.latent_dim)
        self.fc_logvar = nn.Linear(flat, self.latent_dim)
        self.fc_dec = nn.Linear(self.latent_dim, flat)
        # decoder: target sizes retrace the encoder (no pool) or double up to image_size (pool)
        if pool_size:
            targets, cur = [], bottom
            while cur[0] < size[0] or cur[1] < size[1]:
                cur = (cur[0] * 2, cur[1] * 2)
                targets.append(cur)
            if cur != size:
                raise ValueError(f"with pool_size={pool_size}, image_size must be pool_size * 2**k")
        else:
            targets = list(reversed(sizes[:-1]))
        rev = list(reversed(hidden_dims))
        widths = [rev[min(i + 1, len(rev) - 1)] for i in range(len(targets))]
        dec, cin, cur = [], hidden_dims[-1], bottom
        for t, w in zip(targets, widths):
            base = tuple((c - 1) * 2 - 2 * pad + kernel_size for c in cur)
            op = tuple(tt - b for tt, b in zip(t, base))
            if any(o not in (0, 1) for o in op):
                raise ValueError(f"cannot upsample {cur} to {t}")
            dec.append(DeconvBlock(cin, w, kernel_size, 2, pad, op, batchnorm, leaky_slope))
            cin, cur = w, t
        self.decoder = nn.Sequential(*dec)
        self.final = nn.Conv2d(cin, out_channels, 3, 1, 1)
        self.config = dict(in_channels=in_channels, out_channels=out_channels, image_size=image_size,
                           hidden_dims=tuple(hidden_dims), latent_dim=self.latent_dim,
                           kernel_size=kernel_size, pool_size=pool_size, batchnorm=batchnorm,
                           leaky_slope=leaky_slope, output_activation=self.output_activation,
                           recon_loss=recon_loss, beta=beta, input_range=input_range)
        load_weights(self, ckpt_path)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pool(self.encoder(x)).flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc_dec(z).view(z.shape[0], -1, *self.bottom)
        h = self.final(self.decoder(h))
        if self.output_activation == "sigmoid":
            return torch.sigmoid(h)
        if self.output_activation == "tanh":
            return torch.tanh(h)
        return h

    def parts(self) -> dict[str, list[nn.Module]]:
        return {"encoder": [self.encoder, self.pool, self.fc_mu, self.fc_logvar],
                "decoder": [self.fc_dec, self.decoder, self.final], "quantizer": []}

    def last_layer_weight(self) -> torch.Tensor:
        return self.final.weight


class MnistVAE(CNNVAE):
    """The MNIST VAE: sigmoid output, BCE, inputs in [0, 1]."""

    def __init__(self, **overrides):
        super().__init__(**{**PRESETS["mnist"], **overrides})


class CelebaVAE(CNNVAE):
    """The CelebA VAE: AdaptiveAvgPool to 4x4 + FC, tanh output, inputs in [-1, 1]."""

    def __init__(self, **overrides):
        super().__init__(**{**PRESETS["celeba"], **overrides})


_CNN_KEYS = {"in_channels", "out_channels", "image_size", "hidden_dims", "latent_dim",
             "kernel_size", "pool_size", "batchnorm", "leaky_slope", "output_activation",
             "input_range", "ckpt_path"}
# CNNVAE options the trainer does not read (it trains with the stage's losses): where to set them.
_STAGE_KEYS = {"beta": "kl_beta", "recon_loss": "recon_type"}


def build_cnn_vae(preset: str = "mnist", **overrides) -> CNNVAE:
    """`type: cnn_vae` builder: `preset` (mnist | celeba) plus any CNNVAE keyword overrides."""
    from vaeflow.config import ConfigError

    if preset not in PRESETS:
        raise ValueError(f"unknown cnn_vae preset {preset!r}; known: {sorted(PRESETS)}")
    for key, stage_key in _STAGE_KEYS.items():
        if key in overrides:
            raise ConfigError(f"model.{key}", f"the trainer does not read it; set training.pipeline.defaults."
                              f"{stage_key} (or {stage_key} in a step) instead")
    unknown = sorted(set(overrides) - _CNN_KEYS)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown} for cnn_vae; valid: "
                         f"{sorted(_CNN_KEYS | {'preset'})}")
    return (MnistVAE if preset == "mnist" else CelebaVAE)(**overrides)
