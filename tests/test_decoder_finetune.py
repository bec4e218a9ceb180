"""The decoder fine-tune preset (config/sd_decoder_finetune.yaml), run as a user would: Snakemake
from a diffusers-format folder (random weights, tiny widths, the preset's structure) on an image
folder; after both stages the encoder's latents are bit-identical to the source's, the source
and its sha256 are in the provenance, and `vaeflow export --keep-scale` keeps its scale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from support import REPO, make_project, run
from vaeflow.checkpoint import file_digest


@pytest.mark.slow
def test_decoder_finetune_keeps_the_encoder_bit_identical(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image

    from vaeflow.data import PreparedDataset
    from vaeflow.interop.diffusers import from_diffusers
    from vaeflow.models.loading import load_autoencoder

    torch.manual_seed(0)
    src = tmp_path / "sd-vae"
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                            latent_channels=2, norm_num_groups=4, sample_size=16, scaling_factor=0.3).save_pretrained(src)
    rng = np.random.default_rng(0)
    (tmp_path / "images" / "a").mkdir(parents=True)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "images" / "a" / f"{i}.png")

    raw = yaml.safe_load((REPO / "config" / "sd_decoder_finetune.yaml").read_text())
    raw["data"].update(root=str(tmp_path / "images"), image_size=16, split={"val": 0.1, "test": 0.1})
    raw["model"].update(ckpt_path=str(src), resolution=16, base_ch=8, ch_mult=[1, 2], num_res_blocks=1,
                        z_channels=2, embed_dim=2, norm_groups=4)
    raw["discriminator"].update(ndf=8, n_layers=1)
    raw["training"].update(batch_size=8, device="cpu", cpu_threads=1, log_every=1, save_every=2)
    raw["training"]["pipeline"]["defaults"]["max_steps"] = 3  # per epoch
    for step in raw["training"]["pipeline"]["steps"]:
        step["n_epochs"] = 1
    raw["evaluation"].update(batch_size=8, iw_samples=2)
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump(raw))
    project = make_project(tmp_path / "project", config)
    env = dict(HF_HUB_OFFLINE="1", VAEFLOW_LPIPS_RANDOM_BACKBONE="1")
    run(["snakemake", "--cores", "2", "results/decoder_gan/eval/metrics.json"], project, **env)

    best = project / "results" / "decoder_gan" / "best.pt"
    tuned, state = load_autoencoder(best)  # the EMA weights, what evaluation and export use
    source = from_diffusers(src).eval()
    frozen = [k for k in source.state_dict() if k.startswith(("encoder.", "quant_conv."))]
    changed = [k for k, v in source.state_dict().items() if not torch.equal(tuned.state_dict()[k], v)]
    # frozen means frozen: not one bit of the encoder or quant_conv moved, the decoder trained
    assert not set(changed) & set(frozen), f"frozen weights changed: {sorted(set(changed) & set(frozen))[:5]}"
    assert any(k.startswith("decoder.") for k in changed)
    test = PreparedDataset(project / "results" / "data", "test")
    x = torch.stack([test[i] for i in range(len(test))]) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tuned.encode(x).mode(), source.encode(x).mode())
    init = state["provenance"]["init"]
    assert init["kind"] == "diffusers" and init["sha256"] == file_digest(src / "diffusion_pytorch_model.safetensors")
    assert init["scaling_factor"] == pytest.approx(0.3)

    res = run(["vaeflow", "export", str(best), str(tmp_path / "out"), "--keep-scale"], project, **env)
    assert "kept from the source" in res.stdout
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["scaling_factor"] == pytest.approx(0.3) and exported["_class_name"] == "AutoencoderKL"
    assert "started from" in (tmp_path / "out" / "README.md").read_text()
