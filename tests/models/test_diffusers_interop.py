import json

import pytest
import torch

from vaeflow.interop.diffusers import config_to_diffusers, export_diffusers, from_diffusers, to_diffusers
from vaeflow.models.diffusers_keys import diffusers_to_ldm, ldm_to_diffusers
from vaeflow.models import AutoencoderKL, build_model


@pytest.fixture(scope="module")
def diffusers():
    """The reference implementation, imported by the tests that need it (not at collection:
    about 1 s, and torch._dynamo, in every pytest-xdist worker)."""
    return pytest.importorskip("diffusers")

TOL = 1e-5

CONFIGS = {
    "sd_like": dict(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                    down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2,
                    latent_channels=4, norm_num_groups=16, sample_size=32),
    "attn_levels_3": dict(in_channels=1, out_channels=2, block_out_channels=(16, 32, 32),
                          down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D",
                                            "DownEncoderBlock2D"),
                          up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D",
                                          "UpDecoderBlock2D"),
                          layers_per_block=1, latent_channels=3, norm_num_groups=8,
                          sample_size=16, mid_block_add_attention=False),
    "no_quant_asym_attn": dict(in_channels=3, out_channels=3, block_out_channels=(16, 24),
                               down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D"),
                               up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
                               layers_per_block=1, latent_channels=2, norm_num_groups=8,
                               sample_size=16, use_quant_conv=False, use_post_quant_conv=False,
                               scaling_factor=0.3, shift_factor=0.1),
    "gelu_1level": dict(in_channels=4, out_channels=1, block_out_channels=(8,),
                        down_block_types=("AttnDownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), layers_per_block=3,
                        latent_channels=1, norm_num_groups=2, sample_size=8, act_fn="gelu"),
}


def _perturb_norms(m):
    # default GroupNorm init is (1, 0); randomise it so a norm/weight mix-up cannot hide
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))


def _compare(ours, dm, x):
    ours.eval(), dm.eval()
    with torch.no_grad():
        post = ours.encode(x)
        dpost = dm.encode(x).latent_dist
        assert (post.mean - dpost.mean).abs().max() < TOL
        assert (post.logvar - dpost.logvar).abs().max() < TOL
        z = dpost.mean
        assert (ours.decode(z) - dm.decode(z).sample).abs().max() < TOL
        recon, _ = ours(x, sample_posterior=False)
        assert (recon - dm(x, sample_posterior=False).sample).abs().max() < TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_from_diffusers_matches(name, diffusers):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    dm = diffusers.AutoencoderKL(**cfg)
    _perturb_norms(dm)
    ours = from_diffusers(dm)
    assert isinstance(ours, AutoencoderKL)
    x = torch.randn(2, cfg["in_channels"], 24, 32)  # non-square, not the sample size
    _compare(ours, dm, x)
    # and back: to_diffusers gives an identical diffusers model
    dm2 = to_diffusers(ours)
    sd1, sd2 = dm.state_dict(), dm2.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert dict(dm2.config)["block_out_channels"] == list(cfg["block_out_channels"]) or \
        tuple(dm2.config["block_out_channels"]) == tuple(cfg["block_out_channels"])


def test_to_diffusers_from_our_random_model(diffusers):
    torch.manual_seed(1)
    ours = AutoencoderKL(in_channels=3, resolution=32, base_ch=16, ch_mult=(1, 2, 2),
                         num_res_blocks=1, attn_resolutions=(8,), embed_dim=4, norm_groups=8)
    _perturb_norms(ours)
    dm = to_diffusers(ours)
    _compare(ours, dm, torch.randn(1, 3, 32, 32))


def test_state_dict_adapter_round_trip():
    ours = AutoencoderKL(in_channels=3, resolution=16, base_ch=8, ch_mult=(1, 2), num_res_blocks=1,
                         attn_resolutions=(16,), embed_dim=2, norm_groups=4)
    sd = ours.state_dict()
    back = diffusers_to_ldm(ldm_to_diffusers(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    d = ldm_to_diffusers(sd)
    assert d["encoder.down_blocks.0.attentions.0.to_q.weight"].shape == (8, 8)
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in d  # reversed order
    assert torch.equal(d["decoder.up_blocks.1.resnets.0.conv1.weight"],
                       sd["decoder.up.0.block.0.conv1.weight"])


def test_export_round_trip(tmp_path, diffusers):
    torch.manual_seed(2)
    mcfg = dict(type="autoencoder_kl", in_channels=3, resolution=32, base_ch=16, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], embed_dim=4, norm_groups=8)
    ours = build_model(mcfg)
    ema = build_model(mcfg)
    _perturb_norms(ema)
    ckpt = {"format": 1, "config": {"model": mcfg, "seed": 0}, "model": ours.state_dict(),
            "ema": {"weights": ema.state_dict(), "num_updates": 3, "decay": 0.999},
            "stage": "vae_warmup"}
    torch.save(ckpt, tmp_path / "best.pt")
    out = export_diffusers(tmp_path / "best.pt", tmp_path / "export")
    assert (out / "config.json").exists() and (out / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    dm = diffusers.AutoencoderKL.from_pretrained(str(out))
    _compare(ema, dm, torch.randn(1, 3, 32, 32))  # ema weights were exported
    back = from_diffusers(out)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                  ema.state_dict().values()))


def test_original_ldm_checkpoint(tmp_path, diffusers):
    torch.manual_seed(3)
    ours = AutoencoderKL(in_channels=3, resolution=32, base_ch=32, ch_mult=(1, 2), num_res_blocks=1,
                         embed_dim=4)
    sd = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    torch.save({"state_dict": sd, "global_step": 10}, tmp_path / "model.ckpt")
    loaded = from_diffusers(tmp_path / "model.ckpt", resolution=32)
    assert loaded.config["norm_groups"] == 32 and loaded.latent_shape == (4, 16, 16)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                  ours.state_dict().values()))
    # bare encoder/decoder keys load straight through ckpt_path too
    torch.save(ours.state_dict(), tmp_path / "bare.pt")
    again = AutoencoderKL(**{k: v for k, v in ours.config.items()}, ckpt_path=str(tmp_path / "bare.pt"))
    assert torch.equal(again.decoder.conv_out.weight, ours.decoder.conv_out.weight)
    assert config_to_diffusers(again)["block_out_channels"] == [32, 64]


def test_train_mode_gradients_match(diffusers):
    cfg = CONFIGS["attn_levels_3"]
    torch.manual_seed(4)
    dm = diffusers.AutoencoderKL(**cfg)
    _perturb_norms(dm)
    ours = from_diffusers(dm)
    ours.train(), dm.train()
    x = torch.randn(2, cfg["in_channels"], 16, 16)
    r1, _ = ours(x, sample_posterior=False)
    r2 = dm(x, sample_posterior=False).sample
    assert (r1 - r2).abs().max() < TOL
    r1.square().mean().backward()
    r2.square().mean().backward()
    from vaeflow.models.diffusers_keys import ldm_to_diffusers
    g1 = ldm_to_diffusers({n: p.grad for n, p in ours.named_parameters()})
    g2 = {n: p.grad for n, p in dm.named_parameters()}
    assert g1.keys() == g2.keys()
    worst = max((g1[k] - g2[k]).abs().max().item() for k in g1)
    assert worst < TOL
