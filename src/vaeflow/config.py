"""Load, validate and resolve a vaeflow config.

The same functions run inside the Snakefile (before any job is scheduled), in
`vaeflow validate`, and at the start of every stage command, so both runners and
the library API reject a bad config the same way: one message naming the key.
"""

from __future__ import annotations

import copy
import hashlib
import json
from functools import lru_cache
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
    "gan_start": None,
    "lambda_lecam": 0.0,
    "disc_lr_mult": 1.0,
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
    "cpu_threads": None,  # training.cpu_threads (stage_cpu_threads)
    "grad_accum_steps": 1,
    "grad_clip": None,
    "use_amp": "auto",  # vaeflow.trainer.precision: bf16 where it is fast, else fp32
    "amp_dtype": "bf16",
    "allow_microbatching": True,
}

# A train metric and its validation counterpart (loss curves share a panel).
VAL_OF = {"vae_loss": "val_loss", "recon_loss": "val_recon", "kl_loss": "val_kl"}

SCHEMA_FILE = "config.schema.yaml"


# Optimizers that take `fused` (torch's one-kernel Adam); vaeflow.trainer.optim uses it too.
FUSED_OPTIMIZERS = ("Adam", "AdamW")


class ConfigError(ValueError):
    """A config problem, reported as one line naming the key path."""

    def __init__(self, path: str, message: str, source: str | None = None):
        self.path = path
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"config error in {where}{path or '<root>'}: {message}")


def safe_load(text: str):
    """yaml.safe_load, with libyaml's C parser when PyYAML has it (same safe constructor, ~6x faster)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@lru_cache(maxsize=1)
def _schema() -> dict:
    return safe_load(resources.files("vaeflow").joinpath("resources", SCHEMA_FILE).read_text())


def schema() -> dict:
    return copy.deepcopy(_schema())  # parsed once per process


def schema_path() -> Path:
    return Path(str(resources.files("vaeflow").joinpath("resources", SCHEMA_FILE)))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("", "file not found", source=str(path)) from None
    try:
        data = safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"not valid YAML ({exc})", source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("", "expected a mapping at the top level", source=str(path))
    return data


def deep_merge(base: dict, override: dict, typed: bool = False) -> dict:
    """Return base updated by override; nested dicts merge, everything else replaces.
    `typed`: a mapping whose `type` differs from the base's replaces it (an SGD optimizer
    must not inherit AdamW's betas)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        old = out.get(key)
        if typed and isinstance(value, dict) and isinstance(old, dict) and "type" in value and value["type"] != old.get("type"):
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(old, dict):
            out[key] = deep_merge(old, value, typed)
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


def schema_defaults(section: str) -> Any:
    """The defaults of one top-level key (seed) or section (data, evaluation, sampling, ...):
    the one place library code reads them from."""
    sch = schema()
    node = sch["properties"][section]
    if "properties" not in node:
        return copy.deepcopy(node.get("default"))
    out: dict = {}
    _fill_defaults(out, node, sch)
    return out


def validate_section(section: str, values: dict | None, source: str | None = None) -> dict:
    """One top-level section checked and filled like `validate` does it in a whole config
    (for library calls that take a section, e.g. prepare_dataset(data_cfg))."""
    sch = schema()
    values = deep_merge(schema_defaults(section), values or {})
    _schema_check({section: values}, {**sch, "required": [], "properties": {section: sch["properties"][section]}}, source)
    if section == "data":
        _check_data(values, source)
    return values


def validate(config: dict, source: str | None = None) -> dict:
    """Schema + semantic checks. Returns a copy with schema defaults filled in."""
    sch = schema()
    _schema_check(config, sch, source)
    config = copy.deepcopy(config)
    _fill_defaults(config, sch, sch)
    _check_semantics(config, source)
    return config


def _schema_check(config: dict, sch: dict, source: str | None) -> None:
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


def _check_data(data: dict, source: str | None) -> None:
    """Rules across keys of the data: section."""
    if data["split"]["val"] + data["split"]["test"] >= 1:
        raise ConfigError("data.split", "val + test must be < 1 to leave a non-empty train split, "
                          f"got {data['split']['val']} + {data['split']['test']}", source)
    if data["spatial_dims"] == 3 and data["dataset"] != "ct":
        raise ConfigError("data.spatial_dims", f"3 needs data.dataset: ct (volumes), not {data['dataset']!r}", source)
    low, high = data["ct"]["hu_window"]
    if not low < high:
        raise ConfigError("data.ct.hu_window", f"must be [low, high] with low < high, got {[low, high]}", source)


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
        for part, opt in step["optimization"]["optimizers"].items():
            if "fused" in opt and opt["type"] not in FUSED_OPTIMIZERS:
                raise ConfigError(f"{where}.optimization.optimizers.{part}.fused",
                                  f"applies to {' and '.join(FUSED_OPTIMIZERS)}, not {opt['type']}", source)
        if step["gan_training"] and "discriminator" not in step["optimization"]["optimizers"]:
            raise ConfigError(f"{where}.optimization.optimizers", "gan_training needs a discriminator optimizer", source)
        if step["gan_training"] and step["r1_gamma"] > 0 and config["discriminator"]["norm"] == "batch":
            raise ConfigError(
                "discriminator.norm",
                f"steps[{i}] uses an R1 penalty (r1_gamma), which BatchNorm breaks: use group, instance or none",
                source,
            )
        if step["gan_start"] is not None and step["gan_start"] < step["disc_start"]:
            raise ConfigError(f"{where}.gan_start", f"must be >= disc_start ({step['disc_start']}): "
                              "the generator would meet a discriminator that does not train yet", source)
        trans = step["transition_on"]
        if trans.get("mode", "epoch") == "loss_threshold":
            for key in ("metric", "threshold", "max_epochs"):
                if key not in trans:
                    raise ConfigError(f"{where}.transition_on.{key}", "required when mode is loss_threshold", source)
            logged = logged_metrics(step, model_family(config["model"]["type"]))
            available = logged["train"] + logged["val"]
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
    _check_data(config["data"], source)
    for split, why in (("val", "training keeps best.pt by validation loss"), ("test", "evaluate scores the test split")):
        if config["data"]["split"][split] <= 0:  # 0 is for library calls (prepare_dataset) only
            raise ConfigError(f"data.split.{split}", f"must be > 0 in a pipeline config ({why}), got {config['data']['split'][split]}", source)


def model_family(model_type: str) -> str:
    """"kl" (Gaussian posterior) or "vq" (codebook), from the schema's x-latent-family."""
    return schema()["properties"]["model"]["x-latent-family"][model_type]


def logged_metrics(step: dict, family: str) -> dict[str, list[str]]:
    """The loss metrics a stage writes to metrics.jsonl, in order: {"train": [...], "val": [...]}.

    The trainer's log line, transition_on.metric checks, dvc.yaml plots and the loss-curve
    panels all read this. (The trainer also logs diagnostics such as beta or perplexity.)
    """
    train = ["vae_loss", *(["recon_loss"] if step["train_vae"] else []), "kl_loss" if family == "kl" else "vq_loss"]
    if step["gan_training"]:
        train += ["g_loss", "d_loss"]
    if step["use_lpips"]:
        train.append("lpips_loss")
    val = [VAL_OF["vae_loss"], VAL_OF["recon_loss"], *([VAL_OF["kl_loss"]] if family == "kl" else [])]
    return {"train": train, "val": val}


def resolve_steps(config: dict) -> list[dict]:
    """Each step with STEP_DEFAULTS < pipeline.defaults < step (deep merge; an optimizer or
    scheduler of another `type` replaces the one below instead of merging into it)."""
    pipeline = config["training"]["pipeline"]
    defaults = deep_merge(STEP_DEFAULTS, pipeline.get("defaults") or {}, typed=True)
    return [deep_merge(defaults, step, typed=True) for step in pipeline["steps"]]


def stage_names(config: dict) -> list[str]:
    return [s["name"] for s in config["training"]["pipeline"]["steps"]]


def stage_index(config: dict, stage: str) -> int:
    names = stage_names(config)
    if stage not in names:
        raise ConfigError("training.pipeline.steps", f"no stage named {stage!r} (stages: {', '.join(names)})")
    return names.index(stage)


def stage_cpu_threads(config: dict, stage: str) -> int:
    """Intra-op CPU threads of a stage's training (all its processes together): the step's
    cpu_threads, else training.cpu_threads. The train command applies it and the train rule
    reserves it; it changes float reduction order, so it is part of the stage's fingerprint."""
    step = resolve_steps(config)[stage_index(config, stage)]
    return step["cpu_threads"] or config["training"]["cpu_threads"]


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
