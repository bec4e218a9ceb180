"""vaeflow: staged, reproducible VAE training (Snakemake and DVC over one config)."""

__version__ = "0.1.0"


def train(train_ds, config_path, val_ds, results_dir="results"):
    """Library API: run the configured stages on any torch Dataset."""
    from vaeflow.trainer import train as _train

    return _train(train_ds, config_path, val_ds, results_dir)
