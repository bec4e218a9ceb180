"""Every shipped config validates (schema, semantics, model options) and builds its model."""

from __future__ import annotations

import pytest

from support import REPO
from vaeflow import config as cfg
from vaeflow.data import resolve_data_cfg
from vaeflow.preflight import check_code_level

CONFIGS = sorted(p.name for p in (REPO / "config").glob("*.yaml") if p.name != "schema.yaml")


def test_the_presets_the_issue_names_ship():
    assert {"config.yaml", "mnist.yaml", "celeba.yaml", "ct.yaml", "ct3d.yaml"} <= set(CONFIGS)


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
