"""`vaeflow export`: every family round-trips through the library it is exported to (diffusers'
AutoencoderKL / VQModel, or vaeflow's own format) with reconstructions within 1e-4 on the test
split; the exported latent scale is the one evaluation fitted (std 1 +- 5 %), or the source's
with --keep-scale; the model card and the --push-to-hub refusal offline."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from support import REPO, TINY, run
from vaeflow import checkpoint as ckpt
from vaeflow import config as cfg
from vaeflow.data import PreparedDataset
from vaeflow.evaluate import evaluate_checkpoint, write_metrics
from vaeflow.interop.export import ExportError, export_checkpoint
from vaeflow.models import build_model
from vaeflow.models.loading import load_autoencoder, load_exported

BACKBONE = dict(in_channels=1, resolution=8, base_ch=8, ch_mult=[1, 2], num_res_blocks=1, norm_groups=4)
FAMILIES = {  # family -> (model section, what it exports to)
    "kl": (dict(type="autoencoder_kl", embed_dim=2, z_channels=2, mid_attn=False, attn_resolutions=[4], **BACKBONE), "AutoencoderKL"),
    "vq": (dict(type="vqvae", codebook_size=32, embed_dim=4, z_channels=8, **BACKBONE), "VQModel"),
    "lfq": (dict(type="magvit", quantizer="lfq", codebook_size=16, **BACKBONE), "vaeflow"),
    "fsq": (dict(type="magvit", quantizer="fsq", levels=[5, 5, 3], **BACKBONE), "vaeflow"),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def stage_checkpoint(root, model_cfg: dict, data_dir, seed: int = 0):
    """results/vae_warmup/best.pt of a randomly initialised model (as the trainer writes it) and
    its eval/metrics.json."""
    raw = yaml.safe_load(TINY.read_text())
    raw["model"] = model_cfg
    config = cfg.validate(raw)
    torch.manual_seed(seed)
    model = build_model(config["model"])
    if hasattr(model, "quantize") and hasattr(model.quantize, "embed"):  # codes spread like the latents
        with torch.no_grad():
            model.quantize.embed.normal_(0, 0.5)
    path = root / "vae_warmup" / "best.pt"
    state = {"format": ckpt.FORMAT, "config": config, "stage": "vae_warmup", "stage_index": 0,
             "model": model.state_dict(), "ema": None, "epoch": 0, "global_step": 0, "provenance": {}}
    ckpt.save(state, path)
    quick = {"iw_samples": 1, "nll_max_images": 8, "fid_images": 0}  # the latent statistics are what matters here
    write_metrics(evaluate_checkpoint(path, data_dir, eval_cfg=quick, log=lambda *a: None), path.parent / "eval" / "metrics.json")
    return path


def split_images(data_dir) -> torch.Tensor:
    ds = PreparedDataset(data_dir, "test")
    return torch.stack([ds[i] for i in range(len(ds))]) * 2 - 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_round_trips(tmp_path, tiny_data, family):
    diffusers = pytest.importorskip("diffusers")
    model_cfg, kind = FAMILIES[family]
    best = stage_checkpoint(tmp_path, model_cfg, tiny_data)
    out = export_checkpoint(best, tmp_path / "export", log=lambda *a: None)
    ours, _ = load_autoencoder(best)
    x = split_images(tiny_data)
    stats = json.loads((best.parent / "eval" / "metrics.json").read_text())["latent_stats"]
    config = json.loads((out / "config.json").read_text())
    with torch.no_grad():
        mine = ours.ae_forward(x, sample_posterior=False).recon
        if kind == "AutoencoderKL":
            theirs_model = diffusers.AutoencoderKL.from_pretrained(out).eval()
            theirs = theirs_model(x, sample_posterior=False).sample
            # the scale: std of scaling_factor * (z - shift) over the test split's latents is 1 +- 5 %
            z = theirs_model.encode(x).latent_dist.sample(torch.Generator().manual_seed(1))
            scaled = (z - (theirs_model.config.shift_factor or 0.0)) * theirs_model.config.scaling_factor
            assert abs(scaled.std(unbiased=False).item() - 1) < 0.05
            assert abs(scaled.mean().item()) < 0.05
            assert theirs_model.config.scaling_factor == pytest.approx(1 / stats["std"])
            assert theirs_model.config.mid_block_add_attention is False
        elif kind == "VQModel":
            theirs_model = diffusers.VQModel.from_pretrained(out).eval()
            theirs = theirs_model(x).sample
            assert config["vq_embed_dim"] == 4 and config["latent_channels"] == 8
            assert config["scaling_factor"] == pytest.approx(stats["scaling_factor"])
        else:
            again, meta = load_exported(out)
            theirs = again.ae_forward(x, sample_posterior=False).recon
            assert meta["latent"]["scaling_factor"] == pytest.approx(stats["scaling_factor"])
            assert meta["model"]["quantizer"] == family
    assert config.get("_class_name", "vaeflow") == kind
    assert (theirs - mine).abs().max().item() < 1e-4
    card = (out / "README.md").read_text()
    for section in ("## Load it", "## Data", "## Stages", "## Test metrics", "## Latent statistics", "## Provenance"):
        assert section in card
    assert "Protocol: the test split" in card


def test_keep_scale_keeps_the_models_factor_and_fitted_needs_evaluation(tmp_path, tiny_data):
    best = stage_checkpoint(tmp_path, FAMILIES["kl"][0], tiny_data)
    out = export_checkpoint(best, tmp_path / "kept", keep_scale=True, log=lambda *a: None)
    assert json.loads((out / "config.json").read_text())["scaling_factor"] == 0.18215  # the model's own (SD's)
    (best.parent / "eval" / "metrics.json").unlink()
    with pytest.raises(ExportError, match="--keep-scale"):
        export_checkpoint(best, tmp_path / "fitted", log=lambda *a: None)
    assert not (tmp_path / "fitted").exists()


def test_default_config_exports_exactly_and_with_a_bias_the_refusal_says_why():
    """The default's z_channels 4 -> embed_dim 1 latent folds into diffusers' one latent width
    exactly (post_quant_bias: false); with a biased post_quant_conv the border would differ, and
    the refusal says so and names the nearest exportable shapes."""
    diffusers = pytest.importorskip("diffusers")
    from vaeflow.interop.diffusers import to_diffusers
    from vaeflow.interop.export import diffusers_class

    torch.manual_seed(0)
    default = cfg.load(REPO / "config" / "config.yaml")
    model = build_model(default["model"]).eval()
    assert diffusers_class(model) == ("AutoencoderKL", "")
    theirs = to_diffusers(model).eval()
    assert isinstance(theirs, diffusers.AutoencoderKL) and theirs.config.latent_channels == 1
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert (theirs.encode(x).latent_dist.mean - model.encode(x).mean).abs().max() < 1e-5
        assert (theirs(x, sample_posterior=False).sample - model.ae_forward(x, sample_posterior=False).recon).abs().max() < 1e-5
    kind, why = diffusers_class(build_model({**default["model"], "post_quant_bias": True}))
    assert kind is None
    assert "z_channels 4 and embed_dim 1" in why and "model.post_quant_bias: false" in why
    assert "model.z_channels: 1" in why and "--format vaeflow" in why


@pytest.mark.slow
def test_cli_export_and_push_refused_offline(tmp_path, tiny_data):
    best = stage_checkpoint(tmp_path, FAMILIES["kl"][0], tiny_data)
    res = run(["vaeflow", "export", str(best), str(tmp_path / "out"), "--push-to-hub", "me/vae"], tmp_path,
              check=False, HF_HUB_OFFLINE="1")
    assert res.returncode == 2
    assert "--push-to-hub me/vae: HF_HUB_OFFLINE=1" in res.stderr and "nothing was written" in res.stderr
    assert not (tmp_path / "out").exists()
    res = run(["vaeflow", "export-diffusers", str(best), str(tmp_path / "out")], tmp_path, HF_HUB_OFFLINE="1")
    assert "as diffusers AutoencoderKL" in res.stdout and "fitted on the test split" in res.stdout
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").exists()
