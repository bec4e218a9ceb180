"""Generate dvc.yaml from the config: the same stages, commands and edges as Snakemake.

Stage commands are the ones the Snakemake rules run (scripts/*.py). Each DVC stage
tracks only the config keys that determine it (`training.pipeline.steps.<i>` for a
training stage), so changing one stage's parameters reruns it and what follows.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from vaeflow.config import ConfigError, load_yaml, stage_names

DATA_FILES = ["results/data/manifest.json", "results/data/train.npy", "results/data/val.npy", "results/data/test.npy"]
HEADER = "# Generated from the config by `vaeflow dvc-yaml --config {cfg}`: do not edit by hand.\n"


def stage_outputs(stage: str, sample_label: str = "best") -> dict[str, list[str]]:
    """Output files of each rule for one training stage (shared with rules/common.smk)."""
    root = f"results/{stage}"
    return {
        "train": [f"{root}/best.pt", f"{root}/last.pt", f"{root}/metrics.jsonl"],
        "evaluate": [f"{root}/eval/metrics.json"],
        "sample": [
            f"{root}/samples/vae_recon_grid_{sample_label}.png",
            f"{root}/samples/vae_generated_grid_{sample_label}.png",
        ],
    }


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
            "params": [{cfg_path: _present(raw, ["evaluation"])}],
            # Cached (not git-tracked): results/ is git-ignored, and push/pull must carry them.
            "metrics": [outs["evaluate"][0]],
        }
        stages[f"sample_{name}"] = {
            "cmd": f"python scripts/sample.py --config {cfg_path} --checkpoints-root results --run-name {name}",
            "deps": ["scripts/sample.py", best, *DATA_FILES],
            "params": [{cfg_path: _present(raw, ["seed", "sampling"])}],
            "outs": outs["sample"],
        }
    for st in stages.values():  # DVC rejects an empty params list
        st["params"] = [p for p in st["params"] if next(iter(p.values()))]
        if not st["params"]:
            del st["params"]
    return HEADER.format(cfg=cfg_path) + yaml.safe_dump({"stages": stages}, sort_keys=False, width=120)
