"""model.ckpt_path sources (vaeflow.models.pretrained): a diffusers folder, a single .safetensors
file, an LDM .ckpt, a Hub id offline; shapes checked before training with the keys to change;
the source and its sha256 recorded."""

from __future__ import annotations

import pytest
import torch
import yaml

from support import TINY
from vaeflow import config as cfg
from vaeflow.config import ConfigError
from vaeflow.models import build_model
from vaeflow.models.pretrained import record
from vaeflow.preflight import check_code_level

# a tiny diffusers AutoencoderKL and the vaeflow model section that matches it
DIFFUSERS_CFG = dict(in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                     down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                     latent_channels=2, norm_num_groups=4, sample_size=8, scaling_factor=0.5, shift_factor=0.1)
MODEL = dict(type="autoencoder_kl", in_channels=1, resolution=8, base_ch=8, ch_mult=[1, 2], num_res_blocks=1,
             z_channels=2, embed_dim=2, norm_groups=4)


@pytest.fixture
def diffusers_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    dm = diffusers.AutoencoderKL(**DIFFUSERS_CFG).eval()
    dm.save_pretrained(tmp_path / "src")
    return tmp_path / "src", dm


def config_with(model: dict) -> dict:
    raw = yaml.safe_load(TINY.read_text())
    raw["model"] = model
    return cfg.validate(raw)


def test_diffusers_folder_loads_exactly_and_is_recorded(diffusers_folder):
    folder, dm = diffusers_folder
    ours = build_model({**MODEL, "ckpt_path": str(folder)}).eval()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        assert (ours.encode(x).mode() - dm.encode(x).latent_dist.mode()).abs().max() < 1e-5
    rec = record(str(folder))
    assert rec["kind"] == "diffusers" and rec["file"] == "diffusion_pytorch_model.safetensors"
    assert len(rec["sha256"]) == 64 and rec["scaling_factor"] == 0.5 and rec["shift_factor"] == 0.1
    check_code_level(config_with({**MODEL, "ckpt_path": str(folder)}))  # fits: no error


def test_single_safetensors_and_ldm_ckpt(diffusers_folder, tmp_path):
    folder, dm = diffusers_folder
    single = folder / "diffusion_pytorch_model.safetensors"
    a = build_model({**MODEL, "ckpt_path": str(single)})
    ldm = tmp_path / "ldm.ckpt"  # LDM layout: first_stage_model. prefix under state_dict, plus loss.*
    torch.save({"state_dict": {**{f"first_stage_model.{k}": v for k, v in a.state_dict().items()},
                               "loss.logvar": torch.zeros(())}}, ldm)
    b = build_model({**MODEL, "ckpt_path": str(ldm)})
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert record(str(ldm))["kind"] == "torch"


def test_mismatched_shapes_list_the_keys_and_name_the_config_keys(diffusers_folder):
    folder, _ = diffusers_folder
    with pytest.raises(ConfigError) as err:
        check_code_level(config_with({**MODEL, "z_channels": 4, "embed_dim": 4, "num_res_blocks": 2, "ckpt_path": str(folder)}))
    msg = str(err.value)
    assert msg.startswith("config error in model.ckpt_path:")
    assert "missing: encoder.down.0.block.1" in msg  # the second ResBlock per level
    assert "mis-shaped: " in msg and "quant_conv.weight: source [4, 4, 1, 1] vs model [8, 8, 1, 1]" in msg
    assert "model.num_res_blocks: 1 (config: 2)" in msg and "model.z_channels: 2 (config: 4)" in msg
    assert "model.embed_dim: 2 (config: 4)" in msg


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model.ckpt_path: 'stabilityai/sd-vae-ft-mse' is no local file or folder, and as "
                                          r"a Hugging Face Hub id it cannot be downloaded: HF_HUB_OFFLINE=1.*--local-dir DIR"):
        check_code_level(config_with({**MODEL, "ckpt_path": "stabilityai/sd-vae-ft-mse"}))
