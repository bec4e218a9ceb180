"""The PCA baseline: bounded memory (capped, seeded subsample; randomized SVD for big
matrices), and the same numbers as scikit-learn's full-SVD PCA where both apply."""

from __future__ import annotations

import numpy as np
import pytest

from vaeflow import metrics as M
from vaeflow.data import PreparedDataset
from vaeflow.eval import pca as P


@pytest.fixture(scope="module")
def splits(prepared):
    return PreparedDataset(prepared / "data", "train"), PreparedDataset(prepared / "data", "test")


def _sklearn_mse(train, test, k):
    """The previous implementation: scikit-learn PCA, full SVD, whole train split in memory."""
    from sklearn.decomposition import PCA

    a, b = train.tensor().flatten(1).numpy(), test.tensor().flatten(1).numpy()
    pca = PCA(n_components=k, svd_solver="full").fit(a)
    rec = np.clip(pca.inverse_transform(pca.transform(b)), 0, 1)
    return float(((rec - b) ** 2).mean())


def test_exact_path_equals_sklearn_full_svd(splits):
    train, test = splits
    out = P.pca_baseline(train, test, 10, (1, 8, 8))
    assert out["method"] == "exact SVD" and out["fit_images"] == len(train) and out["fit_sample"] == "all"
    assert out["mse"] == pytest.approx(_sklearn_mse(train, test, 10), rel=1e-5)
    assert out["psnr"] == pytest.approx(M.psnr(out["mse"])) and 0 < out["ssim"] <= 1


@pytest.mark.parametrize("k", [5, 20])
def test_randomized_path_is_close_to_exact(splits, k):
    train, test = splits
    exact = P.fit_pca(train, k, 10_000)
    rand = P.fit_pca(train, k, 10_000, exact_max=0)
    assert rand.method.startswith("randomized SVD") and rand.components.shape == (k, 64)
    # the subspaces agree: projecting one basis onto the other keeps (almost) all of it
    overlap = float((rand.components @ exact.components.T).pow(2).sum()) / k
    assert overlap > 0.999
    assert P.pca_baseline(train, test, k, exact_max=0)["mse"] == pytest.approx(P.pca_baseline(train, test, k)["mse"], rel=1e-3)


def test_fit_is_capped_seeded_and_byte_bounded(splits, monkeypatch):
    train, test = splits
    one = P.pca_baseline(train, test, 4, max_images=300, seed=1)
    assert one["fit_images"] == 300 and one["of_images"] == len(train) and "seed 1" in one["fit_sample"]
    assert P.pca_baseline(train, test, 4, max_images=300, seed=1) == one  # repeatable
    assert P.pca_baseline(train, test, 4, max_images=300, seed=2)["mse"] != one["mse"]  # a different subsample
    monkeypatch.setattr(P, "FIT_BYTES", 64 * 4 * 50)  # room for 50 float32 images of 64 pixels
    assert P.fit_pca(train, 4, 10_000).fit_images == 50
