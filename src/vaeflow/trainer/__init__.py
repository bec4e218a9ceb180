"""The staged trainer. `run_stage` trains one stage; `train` runs them all (library API).

`StageTrainer` and `run_stage` are imported on first use, so the torch-free submodules
(`launch`, `slurm`: the Snakefile reads `slurm.train_job_resources`) import without torch.
"""

__all__ = ["StageTrainer", "run_stage", "train"]


def __getattr__(name: str):
    if name in ("StageTrainer", "run_stage"):
        from vaeflow.trainer import stage

        return getattr(stage, name)
    raise AttributeError(f"module 'vaeflow.trainer' has no attribute {name!r}")


def train(train_ds, config_path, val_ds, results_dir="results") -> list[dict]:
    """Run every configured stage on any torch Dataset, in order (the library API).

    Items may be tensors or (tensor, label) pairs with values in [0, 1]; images of
    another size are resized to data.image_size. Checkpoints land under results_dir.
    """
    from vaeflow import config as cfg
    from vaeflow.trainer.stage import run_stage

    config = cfg.load(config_path)
    return [run_stage(config, name, results_dir, train_ds, val_ds) for name in cfg.stage_names(config)]
