"""vaeflow model family.

`build_model(cfg)` builds the model named by `cfg["type"]` (or `cfg["model"]["type"]` for a
full config) with the remaining keys as keyword arguments:

    autoencoder_kl  AutoencoderKL (SD/LDM VAE, 2D/3D)
    vqvae           VQVAE (same backbone, vector quantizer)
    magvit          MAGVIT-style VQ-VAE (quantizer: lfq | fsq)
    cnn_vae         small CNN VAEs (preset: mnist | celeba)

`build_from_json(path)` does the same from a JSON or YAML file.
"""
from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

from .autoencoder_kl import LATENT_SCALE, AutoencoderKL
from .base import AEOutput, Autoencoder, DiagonalGaussian
from .discriminator import NLayerDiscriminator, build_discriminator

# type name -> (module, class); modules are imported on first use
MODEL_REGISTRY: dict[str, tuple[str, str]] = {
    "autoencoder_kl": ("autoencoder_kl", "AutoencoderKL"),
    "vqvae": ("vqvae", "VQVAE"),
    "magvit": ("magvit", "MagvitVQVAE"),
    "cnn_vae": ("cnn_vae", "build_cnn_vae"),
}

def get_model_class(type_name: str):
    key = str(type_name).lower().replace("-", "_")
    if key not in MODEL_REGISTRY:
        raise ValueError(f"unknown model type {type_name!r}; known: {sorted(MODEL_REGISTRY)}")
    mod, name = MODEL_REGISTRY[key]
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


def _model_section(cfg: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise TypeError(f"model config must be a dict, got {type(cfg).__name__}")
    if "type" not in cfg and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]
    if "type" not in cfg:
        raise ValueError("model config needs a 'type' key "
                         f"(one of {sorted(MODEL_REGISTRY)})")
    return cfg


def build_model(cfg: dict[str, Any]):
    """Build a model from its config section (`type` + params) or a full config with `model:`."""
    cfg = dict(_model_section(cfg))
    factory = get_model_class(cfg.pop("type"))
    sig = inspect.signature(factory)
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        unknown = sorted(set(cfg) - set(sig.parameters))
        if unknown:
            raise ValueError(f"unknown model option(s) {unknown} for {factory.__name__}; "
                             f"valid: {sorted(sig.parameters)}")
    for k, v in list(cfg.items()):  # JSON/YAML give lists where the models take tuples
        if isinstance(v, list):
            cfg[k] = tuple(v)
    return factory(**cfg)


def load_config_file(path) -> dict[str, Any]:
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        return json.loads(text)
    import yaml
    return yaml.safe_load(text)


def build_from_json(path):
    """Build a model from a JSON or YAML file holding the model section or a full config."""
    return build_model(load_config_file(path))


__all__ = ["AEOutput", "Autoencoder", "AutoencoderKL", "DiagonalGaussian", "LATENT_SCALE", "MODEL_REGISTRY",
           "NLayerDiscriminator", "build_discriminator", "build_from_json", "build_model",
           "get_model_class", "load_config_file"]
