"""Sampling strategies: tile counts, PNG layout, the perfect-square error, run selection."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from .conftest import TinyMLPVAE, TinyVQ
from vaeflow import sample as S
from vaeflow.cli import main
from vaeflow.layout import StageLayout
from vaeflow.models.loading import load_autoencoder


def _x(n=16, shape=(1, 8, 8), seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def kl_model(kl_run):
    return load_autoencoder(kl_run / "vae_warmup" / "best.pt")[0]


@pytest.mark.parametrize("which", ["kl_spatial", "vector", "vq"])
def test_every_strategy_has_the_right_number_of_tiles(which, request):
    model = request.getfixturevalue("kl_model") if which == "kl_spatial" else (TinyMLPVAE() if which == "vector" else TinyVQ())
    model.eval()
    torch.manual_seed(0)
    x = _x(9)
    n_lat = int(torch.tensor(model.latent_shape).prod())
    base = torch.zeros(model.latent_shape)
    g = S.reconstruction_grid(model, x)
    assert g.tiles.shape == (18, 1, 8, 8) and g.nrow == 2  # 9 originals + 9 reconstructions
    g = S.random_samples(model, 9, torch.Generator().manual_seed(0), "vq" if which == "vq" else "kl")
    assert g.tiles.shape[0] == 9 and g.nrow == 3
    g = S.latent_grid(model, base, (0, n_lat - 1), (-2, 2), steps=5)
    assert g.tiles.shape[0] == 25 and g.nrow == 5
    g = S.traversal(model, base, [0, 1, 2], (-2, 2), steps=6)
    assert g.tiles.shape[0] == 18 and g.nrow == 6
    g = S.interpolation(model, x[:3], x[3:6], steps=4)
    assert g.tiles.shape[0] == 3 * (4 + 2) and g.nrow == 6
    assert torch.equal(g.tiles[0], x[0]) and torch.equal(g.tiles[5], x[3])  # rows start/end with the images
    dims = S.most_informative_dims(model, x, 3)
    assert len(dims) == 3 and len(set(dims)) == 3


def test_latent_grid_sets_the_swept_dims(kl_model):
    """The latents handed to the decoder: rows sweep dims[0], columns dims[1], the rest stays at base."""
    seen = []
    orig = kl_model.decode_latent
    kl_model.decode_latent = lambda z: (seen.append(z.clone()), orig(z))[1]
    try:
        S.latent_grid(kl_model, torch.zeros(kl_model.latent_shape), (3, 7), (-1, 1), steps=3)
    finally:
        del kl_model.decode_latent
    z = seen[0].flatten(1)
    assert z[:, 3].tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1]
    assert z[:, 7].tolist() == [-1, 0, 1] * 3
    assert z[:, [i for i in range(32) if i not in (3, 7)]].abs().sum() == 0


def test_dims_out_of_range(kl_model):
    with pytest.raises(S.SampleError, match=r"out of range: the latent has 32 dimensions"):
        S.latent_grid(kl_model, torch.zeros(kl_model.latent_shape), (0, 32))


def test_prior_statement():
    model = TinyMLPVAE()
    assert "z ~ N(0, I) in 4 dimensions" in S.prior_description(model, "kl")
    assert "uniformly from the codebook" in S.prior_description(TinyVQ(), "vq")


def _png_size(path):
    with Image.open(path) as im:
        return im.size, dict(im.text)


def test_sample_run_writes_every_grid(kl_run, capsys):
    assert main(["sample", "--checkpoints-root", str(kl_run), "--run-name", "vae_warmup", "--samples", "16"]) == 0
    out = capsys.readouterr().out
    assert "random samples decode N(0, I) latents of shape 2x4x4" in out  # spatial KL latent: said so
    samples = kl_run / "vae_warmup" / "samples"
    note = json.loads((samples / "sampling_best.json").read_text())
    assert "N(0, I) latents of shape 2x4x4" in note["prior"] and note["latent_shape"] == [2, 4, 4]
    tiles = {"vae_recon_grid_best.png": (32, 8), "vae_generated_grid_best.png": (16, 4),
             "vae_latent_grid_best.png": (64, 8), "vae_traversal_best.png": (64, 8),
             "vae_interpolation_best.png": (40, 10)}
    scale = 6  # 8-pixel tiles enlarged to 48
    for name, (n, per_row) in tiles.items():
        assert note["files"][name]["tiles"] == n and note["files"][name]["per_row"] == per_row
        (w, h), text = _png_size(samples / name)
        rows = -(-n // per_row)
        assert (w, h) == (per_row * (8 * scale + 2) + 2, rows * (8 * scale + 2) + 2), name
        assert text["Description"] == note["files"][name]["description"] and text["Enlargement"] == "6x nearest neighbour"
    assert sorted(samples.iterdir()) == sorted(StageLayout(kl_run, "vae_warmup").sample_files("best"))


def test_samples_must_be_a_perfect_square(kl_run, capsys):
    assert main(["sample", "--checkpoints-root", str(kl_run), "--samples", "10"]) == 2
    err = capsys.readouterr().err
    assert "vaeflow: error: --samples must be a perfect square (4, 9, 16, 25, ...), got 10" in err
    with pytest.raises(S.SampleError, match="perfect square"):
        S.sample_run(kl_run, "vae_warmup", samples=0)


def test_default_run_is_the_most_recent_and_both_checkpoints(kl_run, tmp_path, capsys):
    root = tmp_path / "results"
    shutil.copytree(kl_run / "data", root / "data")
    for run, t in (("older", 1_000_000), ("newer", 2_000_000)):
        for label in ("best", "last"):
            dst = root / run / f"{label}.pt"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(kl_run / "vae_warmup" / f"{label}.pt", dst)
            os.utime(dst, (t, t))
    assert S.latest_run(root) == "newer"
    assert main(["sample", "--results", str(root), "--checkpoint", "both", "--samples", "4"]) == 0
    assert "most recently updated stage, newer" in capsys.readouterr().out
    newer = StageLayout(root, "newer")
    assert set(newer.sample_files("best")) | set(newer.sample_files("last")) == set(newer.samples.iterdir())
    assert not (root / "older" / "samples").exists()
    with pytest.raises(S.SampleError, match="no stage directory"):
        S.latest_run(tmp_path / "empty")
