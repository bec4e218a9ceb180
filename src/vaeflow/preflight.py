"""Config checks that need the code, not just the schema: the model builds from its
options, sampling indices fit its latent, LPIPS weights are on disk.

vaeflow.config checks the schema and cross-key rules without importing torch (the
Snakefile runs those); every stage command and `vaeflow validate` also run these.
"""

from __future__ import annotations

import math
import os

from vaeflow.config import ConfigError, resolve_steps
from vaeflow.losses.perceptual import check_lpips_weights
from vaeflow.model_fit import check_model_fits


def check_code_level(config: dict) -> None:
    """ConfigError naming the key when the model does not build from model:, a sampling
    index is outside its latent, or a stage's LPIPS backbone weights are missing."""
    model = check_model_fits(config)  # built on the meta device: shapes only
    _check_latent_indices(config, model)
    _check_tensorboard(config)
    if os.environ.get("VAEFLOW_LPIPS_RANDOM_BACKBONE") == "1":
        return
    for i, step in enumerate(resolve_steps(config)):
        if step["use_lpips"]:
            try:
                check_lpips_weights(step["lpips_net"])
            except RuntimeError as exc:
                raise ConfigError(f"training.pipeline.steps[{i}].use_lpips", str(exc)) from None


def _check_tensorboard(config: dict) -> None:
    """logging.tensorboard needs the optional tensorboard package (looked up, not imported)."""
    import importlib.util

    if config["logging"]["tensorboard"] and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard", "true, but the tensorboard package is not installed: "
                          "pip install 'vaeflow[tensorboard]' (or set it to false)")


def _check_latent_indices(config: dict, model) -> None:
    """sampling.latent_dims / traversal_dims index the flattened latent of this model."""
    n = math.prod(model.latent_shape)
    samp = config.get("sampling") or {}
    lists = {"latent_dims": samp.get("latent_dims") or []}
    if isinstance(samp.get("traversal_dims"), list):
        lists["traversal_dims"] = samp["traversal_dims"]
    for key, dims in lists.items():
        bad = [d for d in dims if d >= n]
        if bad:
            shape = "x".join(map(str, model.latent_shape))
            raise ConfigError(f"sampling.{key}", f"{bad} out of range: the model's latent ({shape}) has {n} dimensions, indices 0..{n - 1}")
