"""Load, validate and resolve a vaeflow config.

The same functions run inside the Snakefile (before any job is scheduled), in
`vaeflow validate`, and at the start of every stage command, so both runners and
the library API reject a bad config the same way: one message naming the key.
"""

from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

# Stage keys not given by training.pipeline.defaults or the step itself.
STEP_DEFAULTS: dict[str, Any] = {
    "train_vae": True,
    "gan_training": False,
    "use_lpips": False,
    "recon_type": "mse",
    "focal_gamma": 2.0,
    "kl_beta": 1.0e-6,
    "kl_warmup_steps": 0,
    "kl_free_bits": 0.0,
    "beta_start": None,
    "beta_end": None,
    "beta_steps": 0,
    "tc_weight": 0.0,
    "lambda_vq": 1.0,
    "lambda_lpips": 1.0,
    "lpips_net": "alex",
    "lambda_adv": 0.5,
    "adaptive_weight": True,
    "adaptive_weight_max": 1.0e4,
    "disc_start": 0,
    "r1_gamma": 0.0,
    "freeze": [],
    "unfreeze": [],
    "optimization": {
        "optimizers": {
            "vae": {"type": "AdamW", "lr": 1.0e-4},
            "discriminator": {"type": "AdamW", "lr": 1.0e-4, "betas": [0.5, 0.9]},
        },
        "schedulers": {},
    },
    "transition_on": {"mode": "epoch"},
    "max_steps": None,
    "grad_accum_steps": 1,
    "grad_clip": None,
    "use_amp": False,
    "amp_dtype": "bf16",
    "allow_microbatching": True,
}

# Metrics a stage logs, by the losses it enables (for transition_on.metric checks).
_METRICS_ALWAYS = {"vae_loss", "recon_loss"}

SCHEMA_FILE = "config.schema.yaml"


class ConfigError(ValueError):
    """A config problem, reported as one line naming the key path."""

    def __init__(self, path: str, message: str, source: str | None = None):
        self.path = path
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"config error in {where}{path or '<root>'}: {message}")


def schema() -> dict:
    text = resources.files("vaeflow").joinpath("resources", SCHEMA_FILE).read_text()
    return yaml.safe_load(text)


def schema_path() -> Path:
    return Path(str(resources.files("vaeflow").joinpath("resources", SCHEMA_FILE)))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("", "file not found", source=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"not valid YAML ({exc})", source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("", "expected a mapping at the top level", source=str(path))
    return data


def deep_merge(base: dict, override: dict) -> dict:
    """Return base updated by override; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _key_path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _fill_defaults(instance: Any, node: dict, root: dict) -> None:
    """Insert schema defaults for missing keys (what snakemake.utils.validate does)."""
    if "$ref" in node:
        node = root["$defs"][node["$ref"].split("/")[-1]]
    if not isinstance(instance, dict):
        return
    for key, sub in node.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub, root)


def validate(config: dict, source: str | None = None) -> dict:
    """Schema + semantic checks. Returns a copy with schema defaults filled in."""
    sch = schema()
    validator = jsonschema.Draft202012Validator(sch)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.path), list(map(str, e.path))))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        path = list(err.absolute_path)
        msg = err.message
        if err.validator == "additionalProperties":
            # Name the offending key itself, not its parent.
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            if extra:
                path.append(extra[0])
                allowed = ", ".join(sorted(err.schema.get("properties", {})))
                msg = f"unknown key (allowed here: {allowed})"
        raise ConfigError(_key_path(path), msg, source)
    config = copy.deepcopy(config)
    _fill_defaults(config, sch, sch)
    _check_semantics(config, source)
    return config


def _check_semantics(config: dict, source: str | None) -> None:
    steps = config["training"]["pipeline"]["steps"]
    seen: dict[str, int] = {}
    for i, step in enumerate(steps):
        name = step["name"]
        if name in seen:
            raise ConfigError(
                f"training.pipeline.steps[{i}].name",
                f"duplicate stage name {name!r} (also steps[{seen[name]}])",
                source,
            )
        seen[name] = i
    for i, step in enumerate(resolve_steps(config)):
        where = f"training.pipeline.steps[{i}]"
        conflict = sorted(set(step["freeze"]) & set(step["unfreeze"]))
        if conflict:
            raise ConfigError(f"{where}.freeze", f"{conflict} both frozen and unfrozen", source)
        if not (step["train_vae"] or step["gan_training"]):
            raise ConfigError(where, "enables no training mode (set train_vae and/or gan_training)", source)
        if step["gan_training"] and "discriminator" not in step["optimization"]["optimizers"]:
            raise ConfigError(f"{where}.optimization.optimizers", "gan_training needs a discriminator optimizer", source)
        if step["gan_training"] and step["r1_gamma"] > 0 and config["discriminator"]["norm"] == "batch":
            raise ConfigError(
                "discriminator.norm",
                f"steps[{i}] uses an R1 penalty (r1_gamma), which BatchNorm breaks: use group, instance or none",
                source,
            )
        trans = step["transition_on"]
        if trans.get("mode", "epoch") == "loss_threshold":
            for key in ("metric", "threshold", "max_epochs"):
                if key not in trans:
                    raise ConfigError(f"{where}.transition_on.{key}", "required when mode is loss_threshold", source)
            available = stage_metrics(step)
            if trans["metric"] not in available:
                raise ConfigError(
                    f"{where}.transition_on.metric",
                    f"{trans['metric']!r} is not logged by this stage (available: {', '.join(sorted(available))})",
                    source,
                )
    dist_cfg, batch = config["training"]["distributed"], config["training"]["batch_size"]
    procs = dist_cfg["nproc_per_node"] * dist_cfg["nnodes"]
    if batch % procs:
        raise ConfigError("training.batch_size", f"{batch} images do not split evenly over {procs} processes "
                          "(training.distributed.nproc_per_node x nnodes)", source)
    if config["sampling"]["samples"] ** 0.5 % 1:
        raise ConfigError("sampling.samples", f"must be a perfect square, got {config['sampling']['samples']}", source)
    lo, hi = config["sampling"]["latent_range"]
    if not lo < hi:
        raise ConfigError("sampling.latent_range", f"must be [low, high] with low < high, got {[lo, hi]}", source)
    d0, d1 = config["sampling"]["latent_dims"]
    if d0 == d1:
        raise ConfigError("sampling.latent_dims", f"needs two different dimensions, got {[d0, d1]}", source)
    if config["data"]["split"]["val"] + config["data"]["split"]["test"] >= 1:
        raise ConfigError("data.split", "val + test must leave a non-empty train split", source)


def check_code_level(config: dict) -> None:
    """Checks that need code, not just the schema: model options, LPIPS weights on disk."""
    import os
    import warnings

    from vaeflow.losses.perceptual import check_lpips_weights
    from vaeflow.models import build_model

    try:
        with warnings.catch_warnings():  # "starts from scratch": expected when only checking
            warnings.simplefilter("ignore")
            model = build_model(config["model"])
    except (TypeError, ValueError) as exc:
        raise ConfigError("model", str(exc)) from None
    _check_latent_indices(config, model)
    if os.environ.get("VAEFLOW_LPIPS_RANDOM_BACKBONE") == "1":
        return
    for i, step in enumerate(resolve_steps(config)):
        if step["use_lpips"]:
            try:
                check_lpips_weights(step["lpips_net"])
            except RuntimeError as exc:
                raise ConfigError(f"training.pipeline.steps[{i}].use_lpips", str(exc)) from None


def _check_latent_indices(config: dict, model) -> None:
    """sampling.latent_dims / traversal_dims index the flattened latent of this model."""
    import math

    n = math.prod(getattr(model, "latent_shape", ()) or (0,))
    if not n:
        return
    samp = config.get("sampling") or {}
    lists = {"latent_dims": samp.get("latent_dims") or []}
    if isinstance(samp.get("traversal_dims"), list):
        lists["traversal_dims"] = samp["traversal_dims"]
    for key, dims in lists.items():
        bad = [d for d in dims if d >= n]
        if bad:
            shape = "x".join(map(str, model.latent_shape))
            raise ConfigError(f"sampling.{key}", f"{bad} out of range: the model's latent ({shape}) has {n} dimensions, indices 0..{n - 1}")


def stage_metrics(step: dict) -> set[str]:
    """Names of the metrics a stage logs (and may transition on)."""
    names = set(_METRICS_ALWAYS) | {"kl_loss", "val_loss"}
    if step["gan_training"]:
        names |= {"g_loss", "d_loss"}
    if step["use_lpips"]:
        names.add("lpips_loss")
    return names


def resolve_steps(config: dict) -> list[dict]:
    """Each step with STEP_DEFAULTS < pipeline.defaults < step (seed 003's merge)."""
    pipeline = config["training"]["pipeline"]
    defaults = deep_merge(STEP_DEFAULTS, pipeline.get("defaults") or {})
    return [deep_merge(defaults, step) for step in pipeline["steps"]]


def stage_names(config: dict) -> list[str]:
    return [s["name"] for s in config["training"]["pipeline"]["steps"]]


def stage_index(config: dict, stage: str) -> int:
    names = stage_names(config)
    if stage not in names:
        raise ConfigError("training.pipeline.steps", f"no stage named {stage!r} (stages: {', '.join(names)})")
    return names.index(stage)


def stage_view(config: dict, stage: str) -> dict:
    """Everything that determines a stage's result: a rerun trigger for both runners."""
    i = stage_index(config, stage)
    training = {k: v for k, v in config["training"].items() if k != "pipeline"}
    return {
        "seed": config["seed"],
        "data": config["data"],
        "model": config["model"],
        "discriminator": config["discriminator"],
        "training": training,
        "step": resolve_steps(config)[i],
        "index": i,
    }


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load(paths: str | Path | list[str | Path]) -> dict:
    """Load one or more YAML files (later ones override earlier ones) and validate."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    merged: dict = {}
    for p in paths:
        merged = deep_merge(merged, load_yaml(p))
    return validate(merged, source=", ".join(map(str, paths)))
