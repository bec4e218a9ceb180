"""Generate dvc.yaml from the config: the same stages, commands and edges as Snakemake.

Stage commands are the ones the Snakemake rules run (scripts/*.py). Each DVC stage
tracks only the config keys that determine it (`training.pipeline.steps.<i>` for a
training stage), so changing one stage's parameters reruns it and what follows.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from vaeflow.config import (DVC_DEFAULT_PARAMS, ConfigError, load_yaml, logged_metrics, model_family, resolve_steps,
                            run_layout, stage_names)
from vaeflow.layout import RESULTS
from vaeflow.provenance import CODE_DIR

HEADER = "# Generated from the config by `vaeflow dvc-yaml --config {cfg}`: do not edit by hand.\n"


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


def _stage_plots(name: str, outs: dict[str, list[str]], logged: dict[str, list[str]]) -> list:
    """`dvc plots show` for one stage: the loss-curve PNG, its logged losses, the sample grids."""
    png, train_csv, val_csv = outs["curves"]
    return [
        png,
        {f"{name}_train": {"x": "global_step", "y": {train_csv: logged["train"]}, "title": f"{name}: training losses"}},
        {f"{name}_val": {"x": "global_step", "y": {val_csv: logged["val"]}, "title": f"{name}: validation losses"}},
        *[p for p in outs["sample"] if p.endswith(".png")],
    ]


def render_dvc_yaml(config: dict, config_paths: list[str] | str) -> str:
    if isinstance(config_paths, (str, Path)):
        config_paths = [str(config_paths)]
    if len(config_paths) != 1:
        raise ConfigError("", "dvc.yaml tracks one config file; merge your overrides into a single file for DVC")
    cfg_path = str(config_paths[0])
    raw = load_yaml(cfg_path)
    run = f"--config {cfg_path} --results {RESULTS}"
    LAYOUT = run_layout(config, RESULTS)  # results/, or results/<run>/ for a config with `run:`
    DATA_FILES = [str(p) for p in LAYOUT.data_files()]
    run_arg = f" --run {config['run']}" if config.get("run") else ""
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
        outs = LAYOUT.outputs(name, label)
        deps = ["scripts/train.py", *DATA_FILES]
        if i > 0:
            deps.append(str(LAYOUT.prior_checkpoint(names, name)))
        stages[f"train_{name}"] = {
            "cmd": f"python scripts/train.py {run} --stage {name}",
            "deps": deps,
            "params": [{cfg_path: _present(raw, [*shared, f"training.pipeline.steps.{i}"])}],
            "outs": outs["train"],
        }
        best = str(LAYOUT.stage(name).best)
        stages[f"evaluate_{name}"] = {
            "cmd": f"python scripts/evaluate.py {run} --stage {name}",
            "deps": ["scripts/evaluate.py", best, *DATA_FILES],
            "params": [{cfg_path: _present(raw, ["seed", "evaluation"])}],
            # Cached (not git-tracked): results/ is git-ignored, and push/pull must carry them.
            "metrics": [outs["evaluate"][0]],
        }
        stages[f"sample_{name}"] = {
            "cmd": f"python scripts/sample.py {run} --stage {name}",
            "deps": ["scripts/sample.py", best, *DATA_FILES],
            "params": [{cfg_path: _present(raw, ["seed", "sampling"])}],
            "outs": outs["sample"],
        }
        stages[f"curves_{name}"] = {
            "cmd": f"python scripts/curves.py --results {RESULTS}{run_arg} --stage {name}",
            "deps": ["scripts/curves.py", str(LAYOUT.stage(name).metrics_log)],
            "outs": outs["curves"],
        }
        plots += _stage_plots(name, outs, logged_metrics(steps[i], model_family(config["model"]["type"])))
    stages["summary"] = {
        "cmd": f"python scripts/summary.py {run}",
        "deps": ["scripts/summary.py", *[str(LAYOUT.stage(n).eval_metrics) for n in names]],
        "outs": [str(p) for p in LAYOUT.summary_files()],
    }
    for st in stages.values():  # DVC rejects an empty params list
        st["deps"].insert(1, CODE_DIR)  # the package's source: an edit reruns (vaeflow.provenance)
        st["params"] = [p for p in st.get("params", []) if next(iter(p.values()))]
        if not st["params"]:
            del st["params"]
    # The whole of params.yaml (kept empty): a value `dvc exp run -S key=value` writes there
    # reruns prepare, whose command refuses with the right -S (config.check_unread_params).
    stages["prepare"].setdefault("params", []).append({DVC_DEFAULT_PARAMS: None})
    return HEADER.format(cfg=cfg_path) + yaml.safe_dump({"stages": stages, "plots": plots}, sort_keys=False, width=120)
