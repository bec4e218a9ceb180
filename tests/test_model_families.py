"""Every model family trains through the staged pipeline (warm-up then GAN) by changing only
`model:`, and evaluation and sampling work for each."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from support import TINY
from vaeflow import config as cfg
from vaeflow.data import prepare_dataset
from vaeflow.evaluate import evaluate_checkpoint
from vaeflow.layout import StageLayout
from vaeflow.preflight import check_code_level
from vaeflow.sample import sample_run
from vaeflow.trainer import run_stage

BACKBONE = dict(in_channels=1, resolution=8, base_ch=8, ch_mult=[1, 2], num_res_blocks=1, norm_groups=4)
FAMILIES = {
    "vqvae": dict(type="vqvae", codebook_size=32, embed_dim=4, **BACKBONE),
    "magvit_lfq": dict(type="magvit", quantizer="lfq", codebook_size=16, **BACKBONE),
    "magvit_fsq": dict(type="magvit", quantizer="fsq", levels=[5, 5, 3], **BACKBONE),
    "cnn_vae_mnist": dict(type="cnn_vae", preset="mnist", image_size=8, hidden_dims=[8, 16], latent_dim=6),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    prepare_dataset(yaml.safe_load(TINY.read_text())["data"], root / "data")
    return root / "data"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_evaluates_and_samples(tmp_path, data_dir, family):
    raw = yaml.safe_load(TINY.read_text())
    raw["model"] = FAMILIES[family]
    raw["training"]["pipeline"]["defaults"]["max_steps"] = 3
    if family.startswith("cnn"):
        raw["training"]["pipeline"]["defaults"]["recon_type"] = "bce"
    config = cfg.validate(raw)
    check_code_level(config)
    (tmp_path / "data").symlink_to(data_dir)
    for stage in cfg.stage_names(config):
        run_stage(config, stage, tmp_path)
    best = tmp_path / "vae_gan" / "best.pt"
    metrics = evaluate_checkpoint(best, data_dir)
    assert metrics["mse"] > 0 and metrics["pca"]["components"] >= 1
    records = [json.loads(l) for l in (tmp_path / "vae_gan" / "metrics.jsonl").read_text().splitlines()]
    train = [r["metrics"] for r in records if r["split"] == "train"]
    if family.startswith(("vq", "magvit")):
        assert all("vq_loss" in m for m in train)
    else:
        assert all("kl_loss" in m for m in train)
    written = sample_run(tmp_path, "vae_gan", "best", samples=9, data_dir=data_dir)
    assert written == StageLayout(tmp_path, "vae_gan").sample_files("best")  # five grids and their JSON note
    state = torch.load(best, weights_only=True)
    assert state["config"]["model"]["type"] == FAMILIES[family]["type"]


def test_trained_checkpoint_exports_to_diffusers(tmp_path, data_dir):
    """`vaeflow export-diffusers` hands a pipeline checkpoint to diffusers, same outputs."""
    diffusers = pytest.importorskip("diffusers")
    from support import run
    from vaeflow.models.loading import load_autoencoder

    raw = yaml.safe_load(TINY.read_text())
    raw["training"]["pipeline"]["steps"] = raw["training"]["pipeline"]["steps"][:1]
    config = cfg.validate(raw)
    (tmp_path / "data").symlink_to(data_dir)
    run_stage(config, "vae_warmup", tmp_path)
    out = tmp_path / "diffusers_vae"
    run(["vaeflow", "export-diffusers", str(tmp_path / "vae_warmup" / "best.pt"), str(out), "--keep-scale"], tmp_path,
        HF_HUB_OFFLINE="1")  # not evaluated: no fitted scale (tests/test_export.py)
    theirs = diffusers.AutoencoderKL.from_pretrained(out).eval()
    ours, _ = load_autoencoder(tmp_path / "vae_warmup" / "best.pt")
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        ref = theirs(x, sample_posterior=False).sample
        mine = ours.ae_forward(x, sample_posterior=False).recon
    assert (ref - mine).abs().max().item() < 1e-5
