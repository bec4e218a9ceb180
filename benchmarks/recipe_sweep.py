"""One training recipe of the default pipeline, in-process: both stages from config/config.yaml
plus overrides, then each stage's test PSNR and training seconds.

    python benchmarks/recipe_sweep.py NAME "{'training': {'batch_size': 16}, 'steps': [{'n_epochs': 8}, {'n_epochs': 2}]}"

`steps` overrides training.pipeline.steps entry by entry; everything else merges into the
config. Run variants one after another (never two at once on 2 cores) and compare with
`python benchmarks/recipe_sweep.py base "{}"`, the default recipe, measured the same way.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from vaeflow import config as cfg
from vaeflow.data import prepare_dataset
from vaeflow.evaluate import evaluate_checkpoint
from vaeflow.trainer import run_stage

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a label for this recipe, printed with its results")
    parser.add_argument("overrides", nargs="?", default="{}", help="a Python dict literal of config overrides")
    args = parser.parse_args()
    name, over = args.name, ast.literal_eval(args.overrides)
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    steps_over = over.pop("steps", None) or []
    raw = cfg.deep_merge(raw, over)
    steps = raw["training"]["pipeline"]["steps"]
    steps[: len(steps_over)] = [cfg.deep_merge(step, o) for step, o in zip(steps, steps_over)]
    config = cfg.validate(raw)
    torch.set_num_threads(config["training"]["cpu_threads"])  # as `vaeflow train` does
    root = Path(tempfile.mkdtemp(prefix=f"recipe_{name}_"))
    try:
        prepare_dataset(config["data"], root / "data")
        out = {}
        for stage in cfg.stage_names(config):
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                run_stage(config, stage, root)
            seconds = time.perf_counter() - t
            m = evaluate_checkpoint(root / stage / "best.pt", root / "data",
                                    eval_cfg={"iw_samples": 1, "nll_max_images": 1}, log=lambda *a: None)
            out[stage] = {"test_psnr_db": round(m["psnr"], 3), "train_s": round(seconds, 1)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(name, json.dumps(over), json.dumps(steps_over), json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
