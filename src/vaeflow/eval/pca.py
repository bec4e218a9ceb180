"""The PCA baseline: reconstruction error of PCA with as many components as the model has
latent dimensions, fit on the train split, scored on the test split.

Memory is bounded whatever the dataset size: PCA is fit on at most `evaluation.pca_max_images`
train images (a seeded random subsample, further capped so the float32 fit matrix stays under
`FIT_BYTES`), by an exact SVD when the matrix is small and otherwise a randomized SVD (Halko,
Martinsson & Tropp 2011, with power iterations); the test split is projected batch by batch.
Runs on the evaluation device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vaeflow import metrics as M
from vaeflow.data.dataset import stack_items

FIT_BYTES = 1 << 30  # the float32 fit matrix stays under 1 GiB
EXACT_MAX = 2048  # exact SVD when min(images, dims) is at most this
POWER_ITERATIONS = 6
OVERSAMPLES = 10


@dataclass
class PCAFit:
    mean: torch.Tensor  # [D]
    components: torch.Tensor  # [k, D], orthonormal rows
    fit_images: int
    of_images: int
    method: str


def _rows(ds, idx: list[int]) -> torch.Tensor:
    return stack_items(ds, idx).flatten(1)


def randomized_components(x: torch.Tensor, k: int, generator: torch.Generator,
                          n_iter: int = POWER_ITERATIONS, oversamples: int = OVERSAMPLES) -> torch.Tensor:
    """Top-k right singular vectors [k, D] of the (centered) [n, D] matrix x, by a randomized
    range finder with QR-orthonormalized power iterations (Halko et al. 2011, Alg. 4.4)."""
    q = min(k + oversamples, *x.shape)
    omega = torch.randn(x.shape[1], q, generator=generator, dtype=x.dtype).to(x.device)
    y = torch.linalg.qr(x @ omega).Q
    for _ in range(n_iter):
        y = torch.linalg.qr(x @ torch.linalg.qr(x.T @ y).Q).Q
    _, _, vh = torch.linalg.svd(y.T @ x, full_matrices=False)
    return vh[:k]


def fit_pca(train_ds, k: int, max_images: int, seed: int = 0, device="cpu", batch_size: int = 1024,
            exact_max: int = EXACT_MAX) -> PCAFit:
    n_all = len(train_ds)
    dims = int(_rows(train_ds, [0]).shape[1])
    n = min(n_all, int(max_images), max(2, FIT_BYTES // (4 * dims)))
    idx = np.arange(n_all) if n == n_all else np.sort(np.random.default_rng(seed).choice(n_all, n, replace=False))
    x = torch.empty(n, dims, dtype=torch.float32, device=device)
    for s in range(0, n, batch_size):
        x[s:s + batch_size] = _rows(train_ds, idx[s:s + batch_size].tolist()).to(device)
    mean = _chunked_mean(x, batch_size)
    x -= mean
    k = min(k, n, dims)
    if min(n, dims) <= exact_max:
        comps, method = torch.linalg.svd(x, full_matrices=False)[2][:k], "exact SVD"
    else:
        gen = torch.Generator().manual_seed(seed)
        comps = randomized_components(x, k, gen)
        method = (f"randomized SVD (Halko et al. 2011: {POWER_ITERATIONS} power iterations, "
                  f"{OVERSAMPLES} oversamples, seed {seed})")
    return PCAFit(mean, comps, n, n_all, method)


def _chunked_mean(x: torch.Tensor, batch: int) -> torch.Tensor:
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], batch):
        total += x[s:s + batch].double().sum(0)
    return (total / x.shape[0]).float()


@torch.no_grad()
def pca_baseline(train_ds, test_ds, n_components: int, image_shape: tuple | None = None, *,
                 max_images: int = 10000, seed: int = 0, device="cpu", batch_size: int = 256,
                 exact_max: int = EXACT_MAX) -> dict:
    """MSE, L1, PSNR (and SSIM with `image_shape`) of PCA reconstructions of the test split."""
    fit = fit_pca(train_ds, n_components, max_images, seed, device, exact_max=exact_max)
    sse = sae = 0.0
    n_pix, ssims = 0, []
    for s in range(0, len(test_ds), batch_size):
        x = _rows(test_ds, list(range(s, min(len(test_ds), s + batch_size)))).to(device)
        rec = (((x - fit.mean) @ fit.components.T) @ fit.components + fit.mean).clamp(0, 1)
        sse += float((rec.double() - x.double()).pow(2).sum())
        sae += float((rec.double() - x.double()).abs().sum())
        n_pix += x.numel()
        if image_shape is not None:
            shape = (-1, *image_shape)
            ssims.append(M.ssim_per_image(rec.view(shape), x.view(shape)).cpu())
    mse = sse / max(n_pix, 1)
    out = {"components": int(fit.components.shape[0]), "mse": mse, "l1": sae / max(n_pix, 1), "psnr": M.psnr(mse),
           "fit_split": "train", "fit_images": fit.fit_images, "of_images": fit.of_images,
           "fit_sample": "all" if fit.fit_images == fit.of_images else f"seeded random subsample (seed {seed})",
           "method": fit.method}
    if ssims:
        out["ssim"] = float(torch.cat(ssims).mean())
    return out
