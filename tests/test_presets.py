"""Every shipped config validates (schema, semantics, model options) and builds its model;
the recipes (config/image_dir.yaml, config/sd_vae_f8_256.yaml) hold what their comments say,
and the own-images recipe trains on a folder of real photographs."""

from __future__ import annotations

import pytest

from support import REPO
from vaeflow import config as cfg
from vaeflow.data import resolve_data_cfg
from vaeflow.preflight import check_code_level

CONFIGS = sorted(p.name for p in (REPO / "config").glob("*.yaml") if p.name != "schema.yaml")


def test_the_presets_the_issue_names_ship():
    assert {"config.yaml", "mnist.yaml", "celeba.yaml", "ct.yaml", "ct3d.yaml", "image_dir.yaml",
            "sd_vae_f8_256.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_is_valid(name, monkeypatch):
    # celeba's GAN stage uses LPIPS; its weights are checked separately (they can't be downloaded here)
    monkeypatch.setenv("VAEFLOW_LPIPS_RANDOM_BACKBONE", "1")
    config = cfg.load(REPO / "config" / name)
    if config["model"].get("ckpt_path"):  # pretrained weights the user downloads (tests/models/test_pretrained.py)
        config["model"].pop("ckpt_path")
    check_code_level(config)
    expected = ["decoder_recon", "decoder_gan"] if name == "sd_decoder_finetune.yaml" else ["vae_warmup", "vae_gan"]
    assert cfg.stage_names(config)[:2] == expected
    resolved = resolve_data_cfg(config["data"])  # the data layer accepts the section too
    assert resolved["spatial_dims"] == (3 if name == "ct3d.yaml" else 2)


def latent_factor(model: dict) -> int:
    return 2 ** (len(model["ch_mult"]) - 1)


def test_image_dir_recipe_is_64px_rgb_f8_for_a_cpu():
    c = cfg.load(REPO / "config" / "image_dir.yaml")
    assert c["data"]["dataset"] == "image_dir" and c["data"]["image_size"] == 64 and c["data"]["channels"] == 3
    assert latent_factor(c["model"]) == 8 and c["model"]["embed_dim"] == 4
    dist = c["training"]["distributed"]
    assert dist["nproc_per_node"] * dist["nnodes"] == 1  # one process: a CPU
    steps = cfg.resolve_steps(c)
    assert not any(s["use_lpips"] for s in steps)  # no weight files needed to start


def test_sd_recipe_follows_its_scaling_rule():
    """batch_size = 12 per GPU x GPUs and lr = 4.5e-6 x batch_size (LDM), as the comment says."""
    c = cfg.load(REPO / "config" / "sd_vae_f8_256.yaml")
    m, d = c["model"], c["data"]
    assert d["image_size"] == m["resolution"] == 256 and latent_factor(m) == 8 and m["embed_dim"] in (4, 16)
    assert (m["base_ch"], list(m["ch_mult"]), m["num_res_blocks"]) == (128, [1, 2, 4, 4], 2)  # LDM kl-f8
    dist = c["training"]["distributed"]
    gpus = dist["nproc_per_node"] * dist["nnodes"]
    assert c["training"]["batch_size"] == 12 * gpus
    for step in cfg.resolve_steps(c):
        for name, opt in step["optimization"]["optimizers"].items():
            assert opt["lr"] == pytest.approx(4.5e-6 * c["training"]["batch_size"]), (step["name"], name)
            assert list(opt["betas"]) == [0.5, 0.9], (step["name"], name)
        assert step["kl_beta"] == 1e-6 and step["recon_type"] == "l1" and step["use_lpips"]
    warmup, gan = cfg.resolve_steps(c)
    assert warmup["n_epochs"] * warmup["max_steps"] == 50000  # LDM's disc_start 50001
    assert gan["gan_training"] and gan["lambda_adv"] == 0.5 and gan["disc_start"] == 0  # LDM disc_weight
    assert c["training"]["ema_decay"] == 0.9999 and c["evaluation"]["device"] == "cuda"
    text = (REPO / "config" / "sd_vae_f8_256.yaml").read_text()
    assert f"{c['training']['batch_size']}" in text and "4.32e-4" in text


@pytest.mark.slow  # two training stages in-process: about 15 CPU-s
def test_image_dir_recipe_trains_on_a_folder_of_photographs(tmp_path, monkeypatch):
    """The own-images recipe as shipped (model, losses, optimizers), on scikit-image's natural
    images in a nested folder; only the folder and the step count change: prepare, then both
    stages for two optimizer steps each."""
    import yaml
    from PIL import Image

    skdata = pytest.importorskip("skimage.data")
    from vaeflow.cli import main

    folder = tmp_path / "photos"
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina"]):
        image = getattr(skdata, name)()
        for j, crop in enumerate((image, image[::-1], image[:, ::-1])):  # 18 files, 3 per photo
            sub = folder / f"set{i % 2}"
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop).save(sub / f"{name}_{j}.{'png' if j else 'jpg'}")
    c = yaml.safe_load((REPO / "config" / "image_dir.yaml").read_text())
    c["data"]["root"] = str(folder)
    c["data"]["split"] = {"val": 0.15, "test": 0.15}
    c["training"]["batch_size"] = 4
    c["training"]["cpu_threads"] = 1
    c["training"]["sample_every_epoch"] = False  # the grids are not what this tests
    c["training"]["pipeline"]["defaults"]["max_steps"] = 2
    for step in c["training"]["pipeline"]["steps"]:
        step["n_epochs"] = 1
    path = tmp_path / "image_dir.yaml"
    path.write_text(yaml.safe_dump(c))
    monkeypatch.setenv("VAEFLOW_LPIPS_RANDOM_BACKBONE", "1")
    results = tmp_path / "results"
    assert main(["prepare", "--config", str(path), "--results", str(results)]) == 0
    assert main(["train", "--config", str(path), "--results", str(results), "--stage", "vae_warmup"]) == 0
    assert main(["train", "--config", str(path), "--results", str(results), "--stage", "vae_gan"]) == 0
    import torch

    ckpt = torch.load(results / "vae_gan" / "best.pt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 2 and ckpt["config"]["model"]["resolution"] == 64
