"""Generate dvc.yaml from the config: the same stages, commands and edges as Snakemake.

Stage commands are the ones the Snakemake rules run (scripts/*.py). Each DVC stage
tracks only the config keys that determine it (`training.pipeline.steps.<i>` for a
training stage), so changing one stage's parameters reruns it and what follows.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from vaeflow.config import ConfigError, load_yaml, resolve_steps, stage_names
from vaeflow.provenance import CODE_DIR

DATA_FILES = ["results/data/manifest.json", "results/data/train.npy", "results/data/val.npy", "results/data/test.npy"]
HEADER = "# Generated from the config by `vaeflow dvc-yaml --config {cfg}`: do not edit by hand.\n"


SUMMARY_FILES = ["results/summary.csv", "results/summary.md", "results/summary.html"]
SAMPLE_PNGS = ["vae_recon_grid", "vae_generated_grid", "vae_latent_grid", "vae_traversal", "vae_interpolation"]
CURVE_FILES = ["loss_curves.png", "train.csv", "val.csv"]


def stage_outputs(stage: str, sample_label: str = "best") -> dict[str, list[str]]:
    """Output files of each rule for one training stage (shared with rules/common.smk).
    The names match vaeflow.sample.output_names and vaeflow.report.CURVE_FILES (tested)."""
    root = f"results/{stage}"
    return {
        "train": [f"{root}/best.pt", f"{root}/last.pt", f"{root}/metrics.jsonl"],
        "evaluate": [f"{root}/eval/metrics.json"],
        "sample": [f"{root}/samples/{name}_{sample_label}.png" for name in SAMPLE_PNGS]
        + [f"{root}/samples/sampling_{sample_label}.json"],
        "curves": [f"{root}/plots/{name}" for name in CURVE_FILES],
    }


def _curve_columns(model_type: str, step: dict) -> tuple[list[str], list[str]]:
    """Columns of train.csv / val.csv that `dvc plots show` draws for a stage."""
    kl = model_type in ("autoencoder_kl", "cnn_vae")
    train = ["vae_loss", *(["recon_loss"] if step.get("train_vae", True) else []), "kl_loss" if kl else "vq_loss"]
    if step.get("gan_training"):
        train += ["g_loss", "d_loss"]
    if step.get("use_lpips"):
        train.append("lpips_loss")
    val = ["val_loss", "val_recon"] + (["val_kl"] if kl else [])
    return train, val


def _present(raw: dict, keys: list[str]) -> list[str]:
    """DVC fails on a params key missing from the file, so list only those present."""
    out = []
    for key in keys:
        node = raw
        for part in key.split("."):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                break
        else:
            out.append(key)
    return out


def render_dvc_yaml(config: dict, config_paths: list[str] | str) -> str:
    if isinstance(config_paths, (str, Path)):
        config_paths = [str(config_paths)]
    if len(config_paths) != 1:
        raise ConfigError("", "dvc.yaml tracks one config file; merge your overrides into a single file for DVC")
    cfg_path = str(config_paths[0])
    raw = load_yaml(cfg_path)
    run = f"--config {cfg_path} --results results"
    training_globals = [f"training.{k}" for k in (raw.get("training") or {}) if k != "pipeline"]
    shared = ["seed", "data", "model", "discriminator", *training_globals, "training.pipeline.defaults"]

    raw_root = config["data"].get("root")
    stages: dict[str, dict] = {
        "prepare": {
            "cmd": f"python scripts/prepare.py {run}",
            "deps": ["scripts/prepare.py", *([raw_root] if raw_root else [])],
            "params": [{cfg_path: _present(raw, ["data"])}],
            "outs": list(DATA_FILES),
        }
    }
    label = config["sampling"]["checkpoint"]
    names = stage_names(config)
    steps = resolve_steps(config)
    plots: list = []
    for i, name in enumerate(names):
        outs = stage_outputs(name, label)
        deps = ["scripts/train.py", *DATA_FILES]
        if i > 0:
            deps.append(f"results/{names[i - 1]}/best.pt")
        stages[f"train_{name}"] = {
            "cmd": f"python scripts/train.py {run} --stage {name}",
            "deps": deps,
            "params": [{cfg_path: _present(raw, [*shared, f"training.pipeline.steps.{i}"])}],
            "outs": outs["train"],
        }
        best = f"results/{name}/best.pt"
        stages[f"evaluate_{name}"] = {
            "cmd": f"python scripts/evaluate.py {run} --stage {name}",
            "deps": ["scripts/evaluate.py", best, *DATA_FILES],
            "params": [{cfg_path: _present(raw, ["seed", "evaluation"])}],
            # Cached (not git-tracked): results/ is git-ignored, and push/pull must carry them.
            "metrics": [outs["evaluate"][0]],
        }
        stages[f"sample_{name}"] = {
            "cmd": f"python scripts/sample.py --config {cfg_path} --checkpoints-root results --run-name {name}",
            "deps": ["scripts/sample.py", best, *DATA_FILES],
            "params": [{cfg_path: _present(raw, ["seed", "sampling"])}],
            "outs": outs["sample"],
        }
        stages[f"curves_{name}"] = {
            "cmd": f"python scripts/curves.py --results results --stage {name}",
            "deps": ["scripts/curves.py", f"results/{name}/metrics.jsonl"],
            "outs": outs["curves"],
        }
        train_cols, val_cols = _curve_columns(config["model"]["type"], steps[i])
        plots += [
            outs["curves"][0],
            {f"{name}_train": {"x": "global_step", "y": {outs["curves"][1]: train_cols}, "title": f"{name}: training losses"}},
            {f"{name}_val": {"x": "global_step", "y": {outs["curves"][2]: val_cols}, "title": f"{name}: validation losses"}},
            *[p for p in outs["sample"] if p.endswith(".png")],
        ]
    stages["summary"] = {
        "cmd": f"python scripts/summary.py {run}",
        "deps": ["scripts/summary.py", *[stage_outputs(n, label)["evaluate"][0] for n in names]],
        "outs": list(SUMMARY_FILES),
    }
    for st in stages.values():  # DVC rejects an empty params list
        st["deps"].insert(1, CODE_DIR)  # the package's source: an edit reruns (vaeflow.provenance)
        st["params"] = [p for p in st.get("params", []) if next(iter(p.values()))]
        if not st["params"]:
            del st["params"]
    return HEADER.format(cfg=cfg_path) + yaml.safe_dump({"stages": stages, "plots": plots}, sort_keys=False, width=120)
