"""Shared model types: the `Autoencoder` contract every model family implements, the
`AEOutput` its `ae_forward` returns and the `DiagonalGaussian` posterior.

`DiagonalGaussian` follows LDM's `DiagonalGaussianDistribution` (logvar clamped to [-30, 20],
KL and NLL summed over every non-batch dimension) so that latent shapes [B, C, H, W],
[B, C, D, H, W] and flat [B, latent_dim] all work.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


# The trainer's source of posterior noise (vaeflow.trainer.noise): fn(shape, device, dtype)
# -> eps. None: torch's global RNG, as any library user expects.
_NOISE: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("vaeflow_posterior_noise", default=None)


@contextlib.contextmanager
def posterior_noise(source: Callable | None) -> Iterator[None]:
    """`DiagonalGaussian.sample()` without a generator draws from `source(shape, device, dtype)`."""
    token = _NOISE.set(source)
    try:
        yield
    finally:
        _NOISE.reset(token)


class DiagonalGaussian:
    """Diagonal Gaussian q(z|x).

    Build it from the encoder's `parameters` ([B, 2C, ...], split along dim 1 into mean and
    logvar), or from `mean=` and `logvar=` directly.
    """

    def __init__(self, parameters: torch.Tensor | None = None, deterministic: bool = False, *,
                 mean: torch.Tensor | None = None, logvar: torch.Tensor | None = None):
        if parameters is not None:
            if mean is not None or logvar is not None:
                raise ValueError("give either parameters or mean/logvar, not both")
            mean, logvar = torch.chunk(parameters, 2, dim=1)
        elif mean is None or logvar is None:
            raise ValueError("DiagonalGaussian needs parameters or both mean and logvar")
        self.parameters = parameters
        self.mean = mean
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def _dims(self) -> list[int]:
        return list(range(1, self.mean.ndim))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.deterministic:
            return self.mean
        source = _NOISE.get() if generator is None else None
        if source is not None:
            eps = source(self.mean.shape, self.mean.device, self.mean.dtype)
        else:
            eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                              dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        """KL(self || other) per sample (N(0, I) when `other` is None), summed over latent dims."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = self._dims()
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
            - self.logvar + other.logvar, dim=dims)

    def nll(self, sample: torch.Tensor, dims: list[int] | None = None) -> torch.Tensor:
        """Negative log-likelihood of `sample` under this Gaussian, summed over `dims`."""
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device, dtype=sample.dtype)
        dims = self._dims() if dims is None else dims
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar
                               + (sample - self.mean).pow(2) / self.var, dim=dims)

    def to(self, *args, **kwargs) -> "DiagonalGaussian":
        return DiagonalGaussian(mean=self.mean.to(*args, **kwargs),
                                logvar=self.logvar.to(*args, **kwargs),
                                deterministic=self.deterministic)


@dataclass
class AEOutput:
    """What `ae_forward` returns.

    recon: reconstruction in the model's `input_range`;
    posterior: `DiagonalGaussian` for KL models, `None` for VQ models;
    reg_loss: scalar VQ codebook + commitment (+ entropy) term, `None` for KL models;
    stats: plain floats (perplexity, codebook usage, ...), safe to log.
    """

    recon: torch.Tensor
    posterior: DiagonalGaussian | None = None
    reg_loss: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)


class Autoencoder(torch.nn.Module):
    """What the trainer, evaluation and sampling use of a model, and nothing else.

    A family subclasses this and implements `ae_forward`, `latent_shape`, `parts`,
    `last_layer_weight`, and `encode`/`decode` (or overrides `encode_latent`/`decode_latent`).
    """

    input_range: str = "signed"  # "signed": the trainer feeds [-1, 1]; "unit": [0, 1] (BCE models)

    def ae_forward(self, x: torch.Tensor, sample_posterior: bool = True) -> AEOutput:
        """recon, posterior (KL models) or None (VQ), reg_loss (VQ) or None, float stats."""
        raise NotImplementedError

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic latent: by default the first item `encode(x)` returns (the
        posterior mean, or the quantized code of taming-style VQ models)."""
        return self.encode(x)[0]

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latent shape."""
        raise NotImplementedError

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n latents from the prior; by default N(0, I) over `latent_shape`."""
        p = next(self.parameters())
        # drawn on the generator's device, then moved: a CPU generator works on every device
        where = generator.device if generator is not None else p.device
        return torch.randn((n, *self.latent_shape), generator=generator, device=where, dtype=p.dtype).to(p.device)

    def parts(self) -> dict[str, list[torch.nn.Module]]:
        """{"encoder": [...], "decoder": [...], "quantizer": [...]}: what a stage may freeze."""
        raise NotImplementedError

    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's final conv weight (the adaptive GAN weight's gradient ratio)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# weight loading shared by every model's `ckpt_path`

_STRIP_PREFIXES = ("first_stage_model.", "module.", "_orig_mod.", "model.")


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Pull a model state dict out of whatever `torch.load` returned.

    Accepts a raw state dict, a vaeflow checkpoint (``ema`` preferred, else ``model``; the EMA
    entry may itself be ``{"weights": state_dict, "num_updates": ...}``), a Lightning/LDM
    checkpoint (``state_dict``), or an EMA wrapper dict (``shadow``/``module``).
    """
    if not isinstance(obj, dict):
        raise TypeError(f"checkpoint is a {type(obj).__name__}, expected a dict")
    for key in ("ema", "model", "state_dict", "weights", "shadow", "module", "params", "ema_model"):
        sub = obj.get(key)
        if isinstance(sub, dict) and sub:
            if all(isinstance(v, torch.Tensor) for v in sub.values()):
                return sub
            return extract_state_dict(sub)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError("could not find a state dict in the checkpoint "
                     f"(top-level keys: {sorted(obj)[:10]})")


def clean_state_dict(sd: dict[str, torch.Tensor], own_keys) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (LDM's ``first_stage_model.``, DDP's ``module.``, compile's
    ``_orig_mod.``) and drop LDM training-only entries (``loss.*``)."""
    own = set(own_keys)
    out = {}
    for k, v in sd.items():
        if k in own:
            out[k] = v
            continue
        kk = k
        changed = True
        while changed and kk not in own:
            changed = False
            for p in _STRIP_PREFIXES:
                if kk.startswith(p):
                    kk = kk[len(p):]
                    changed = True
        if kk.startswith("loss.") or kk.startswith("model_ema."):
            continue
        out[kk] = v
    return out


def load_weights(model: torch.nn.Module, ckpt_path: str | None) -> None:
    """Load `ckpt_path` into `model` (every key and shape must match; `vaeflow.models.pretrained`
    reads diffusers / LDM / vaeflow sources and names what differs); warn when there is none."""
    if not ckpt_path:
        warnings.warn(f"{type(model).__name__}: no ckpt_path given, the model starts from scratch "
                      "(random initialisation)", UserWarning, stacklevel=3)
        return
    from .pretrained import load_into

    load_into(model, ckpt_path)


def set_memory_format(module: torch.nn.Module, channels_last: bool, spatial_dims: int):
    """Convert `module` to channels-last when asked; return the input memory format to use."""
    if not channels_last:
        return torch.contiguous_format
    fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    module.to(memory_format=fmt)
    return fmt
