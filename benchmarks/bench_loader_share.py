"""The data loader's share of a training step on the default config (target: < 5 %).

Times, for the same batches, the prepared-data fetch (memmap read + float conversion)
against the full train step (forward, backward, optimizer, EMA) of the first stage.

    python benchmarks/bench_loader_share.py [--config config/config.yaml] [--steps 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from vaeflow import config as cfg
from vaeflow.data import PreparedDataset, prepare_dataset
from vaeflow.metrics import to_model_range
from vaeflow.trainer.batches import epoch_order
from vaeflow.trainer.stage import StageTrainer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args(argv)
    config = cfg.load(args.config)
    stage = cfg.stage_names(config)[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp)
        prepare_dataset(config["data"], results / "data")
        train = PreparedDataset(results / "data", "train")
        val = PreparedDataset(results / "data", "val")
        trainer = StageTrainer(config, stage, results, train, val)
        bs = trainer.batch_size
        order = epoch_order(len(train), config["seed"], 0, 0)
        n_batches = len(train) // bs
        fetch_s = step_s = 0.0
        for i in range(args.steps + 5):
            idx = order[(i % n_batches) * bs : (i % n_batches + 1) * bs]
            t0 = time.perf_counter()
            x = to_model_range(trainer.train_data.fetch(idx), trainer.models.model).to(trainer.devices.main)
            t1 = time.perf_counter()
            trainer.train_step(x, trainer.state)
            trainer.train_step.optimizer_step(trainer.state)
            t2 = time.perf_counter()
            if i >= 5:  # warm-up steps excluded
                fetch_s += t1 - t0
                step_s += t2 - t1
    n = args.steps
    print(f"config {args.config}, stage {stage}, batch {bs}, {torch.get_num_threads()} threads, {n} steps")
    print(f"loader (prepared memmap fetch): {1e3 * fetch_s / n:.3f} ms/batch")
    print(f"train step (fwd+bwd+opt+EMA):   {1e3 * step_s / n:.1f} ms/batch")
    print(f"loader share of the step: {100 * fetch_s / (fetch_s + step_s):.2f} % (target < 5 %)")


if __name__ == "__main__":
    main()
