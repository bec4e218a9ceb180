"""Test-split evaluation of a trained stage, with a PCA baseline of equal latent size.

Metrics are computed on [0, 1] images with the EMA weights and the posterior mode
(the deterministic reconstruction a user would ship).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from vaeflow.checkpoint import atomic_write
from vaeflow.models.loading import load_autoencoder
from vaeflow.trainer.stage import _to_model_range, _to_unit


def _batches(ds, batch_size: int):
    for start in range(0, len(ds), batch_size):
        idx = list(range(start, min(start + batch_size, len(ds))))
        yield torch.stack(ds.__getitems__(idx)) if hasattr(ds, "__getitems__") else torch.stack([ds[i] for i in idx])


def psnr(mse: float, data_range: float = 1.0) -> float:
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def pca_baseline(train: np.ndarray, test: np.ndarray, n_components: int) -> dict:
    """Reconstruction error of PCA (fit on train) keeping n_components dimensions."""
    from sklearn.decomposition import PCA

    k = min(n_components, train.shape[0], train.shape[1])
    pca = PCA(n_components=k, svd_solver="full").fit(train)
    rec = pca.inverse_transform(pca.transform(test)).clip(0, 1)
    mse = float(((rec - test) ** 2).mean())
    return {"components": int(k), "mse": mse, "l1": float(np.abs(rec - test).mean()), "psnr": psnr(mse)}


@torch.no_grad()
def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path, batch_size: int = 256) -> dict:
    from vaeflow.data import PreparedDataset

    model, state = load_autoencoder(checkpoint)
    test = PreparedDataset(data_dir, "test")
    train = PreparedDataset(data_dir, "train")
    sq, ab, n_pix, n_img, kl_sum = 0.0, 0.0, 0, 0, 0.0
    per_image_psnr = []
    for x in _batches(test, batch_size):
        out = model.ae_forward(_to_model_range(x, model), sample_posterior=False)
        rec = _to_unit(out.recon.float(), model)
        err = (rec - x).pow(2).flatten(1).mean(1)
        per_image_psnr += [psnr(float(e)) for e in err]
        sq += float((rec - x).pow(2).sum())
        ab += float((rec - x).abs().sum())
        n_pix += x.numel()
        n_img += x.shape[0]
        if out.posterior is not None:
            kl_sum += float(out.posterior.kl().sum())
    mse = sq / n_pix
    latent_dims = int(np.prod(model.latent_shape))
    flat = lambda ds: np.concatenate([b.flatten(1).numpy() for b in _batches(ds, 1024)])
    metrics = {
        "stage": state["stage"],
        "checkpoint": str(checkpoint),
        "weights": "ema" if state.get("ema") is not None else "model",
        "test_images": n_img,
        "latent_dims": latent_dims,
        "mse": mse,
        "l1": ab / n_pix,
        "psnr": psnr(mse),
        "psnr_mean_per_image": float(np.mean(per_image_psnr)),
        "pca": pca_baseline(flat(train), flat(test), latent_dims),
    }
    if kl_sum > 0:
        metrics["kl_per_image"] = kl_sum / n_img
    metrics["beats_pca"] = metrics["mse"] < metrics["pca"]["mse"]
    return metrics


def write_metrics(metrics: dict, out: str | Path) -> None:
    atomic_write(out, lambda f: f.write((json.dumps(metrics, indent=2) + "\n").encode()))
