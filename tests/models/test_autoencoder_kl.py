import json
import warnings

import pytest
import torch

from vaeflow.models import (AEOutput, AutoencoderKL, DiagonalGaussian, build_discriminator,
                            build_from_json, build_model)


TINY = dict(type="autoencoder_kl", in_channels=3, resolution=32, base_ch=16, ch_mult=(1, 2),
            num_res_blocks=1, attn_resolutions=(16,), embed_dim=4, norm_groups=8)


def test_default_config_latents_256():
    torch.manual_seed(0)
    model = build_model({"type": "autoencoder_kl"}).eval()
    assert model.latent_shape == (4, 32, 32)
    assert model.encoder.conv_in.out_channels == 128
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        z = model.encode_latent(x)
        assert z.shape == (1, 4, 32, 32)
        assert model.decode_latent(z[:, :, :8, :8]).shape == (1, 3, 64, 64)


def test_tiny_2d_contract():
    torch.manual_seed(0)
    model = build_model(TINY)
    assert model.input_range == "signed"
    x = torch.randn(2, 3, 32, 32)
    out = model.ae_forward(x)
    assert isinstance(out, AEOutput) and out.reg_loss is None
    assert isinstance(out.posterior, DiagonalGaussian)
    assert out.recon.shape == x.shape
    assert out.posterior.kl().shape == (2,)
    assert out.posterior.nll(out.posterior.sample()).shape == (2,)
    recon, post = model(x, sample_posterior=False)
    assert torch.allclose(model.encode(x, normalize=True), post.mode() * 0.18215)
    assert torch.equal(model.encode_latent(x), post.mode())
    assert model.latent_shape == (4, 16, 16)
    g = torch.Generator().manual_seed(1)
    z = model.sample_prior(3, generator=g)
    assert z.shape == (3, 4, 16, 16)
    assert model.decode_latent(z).shape == (3, 3, 32, 32)
    assert model.decode(z * model.LATENT_SCALE, denorm=True).allclose(model.decode(z), atol=1e-5)
    parts = model.parts()
    assert set(parts) == {"encoder", "decoder", "quantizer"}
    n_parts = sum(p.numel() for mods in parts.values() for m in mods for p in m.parameters())
    assert n_parts == sum(p.numel() for p in model.parameters())
    assert model.last_layer_weight() is model.decoder.conv_out.weight
    assert len(model.encoder.down[0].attn) == 0 and len(model.encoder.down[1].attn) == 1
    assert len(model.decoder.up[0].attn) == 0 and len(model.decoder.up[1].attn) == 2


def test_gradients_reach_every_parameter(grads_missing):
    torch.manual_seed(0)
    model = build_model(TINY)
    out = model.ae_forward(torch.randn(2, 3, 32, 32))
    loss = out.recon.square().mean() + out.posterior.kl().mean()
    assert grads_missing(model, loss) == []


def test_3d_volume(grads_missing):
    torch.manual_seed(0)
    model = build_model(dict(TINY, in_channels=1, spatial_dims=3, resolution=16,
                             attn_resolutions=(8,), tanh_out=True))
    x = torch.randn(1, 1, 16, 16, 16)
    out = model.ae_forward(x)
    assert out.recon.shape == x.shape and out.recon.abs().max() <= 1
    assert model.latent_shape == (4, 8, 8, 8)
    assert model.encode_latent(x).shape == (1, 4, 8, 8, 8)
    assert grads_missing(model, out.recon.mean() + out.posterior.kl().mean()) == []


def test_down_channels_and_norm_default():
    model = AutoencoderKL(in_channels=1, resolution=16, down_channels=(24, 48, 48),
                          num_res_blocks=1, embed_dim=3)
    assert model.encoder.conv_in.out_channels == 24
    assert model.encoder.norm_out.num_groups == 24
    assert model.latent_shape == (3, 4, 4)
    assert model(torch.randn(1, 1, 16, 16))[0].shape == (1, 1, 16, 16)


def test_ckpt_path_and_warning(tmp_path):
    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY.items() if k != "type"}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = AutoencoderKL(**cfg)
    assert any("from scratch" in str(x.message) for x in w)
    # vaeflow checkpoint layout: ema preferred over model
    b = AutoencoderKL(**cfg)
    torch.save({"model": b.state_dict(), "ema": a.state_dict(), "format": 1}, tmp_path / "c.pt")
    c = AutoencoderKL(**cfg, ckpt_path=str(tmp_path / "c.pt"))
    assert torch.equal(c.decoder.conv_out.weight, a.decoder.conv_out.weight)
    # LDM layout: first_stage_model.* plus loss.* entries
    sd = {"first_stage_model." + k: v for k, v in b.state_dict().items()}
    sd["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": sd}, tmp_path / "ldm.ckpt")
    d = AutoencoderKL(**cfg, ckpt_path=str(tmp_path / "ldm.ckpt"))
    assert torch.equal(d.encoder.conv_in.weight, b.encoder.conv_in.weight)


def test_build_from_json_and_yaml(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"model": dict(TINY, ch_mult=[1, 2])}))
    assert build_from_json(tmp_path / "m.json").latent_shape == (4, 16, 16)
    (tmp_path / "m.yaml").write_text("type: autoencoder_kl\nresolution: 16\nbase_ch: 8\n"
                                     "ch_mult: [1, 1]\nnum_res_blocks: 1\nembed_dim: 2\n")
    assert build_from_json(tmp_path / "m.yaml").latent_shape == (2, 8, 8)
    with pytest.raises(ValueError, match="unknown model option"):
        build_model(dict(TINY, bogus=1))
    with pytest.raises(ValueError, match="unknown model type"):
        build_model({"type": "nope"})


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_discriminator_2d(norm):
    d = build_discriminator({"ndf": 8, "n_layers": 3, "norm": norm}, in_channels=3, spatial_dims=2)
    y = d(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 1, 6, 6)


def test_discriminator_3d_and_r1():
    d = build_discriminator({"ndf": 4, "n_layers": 2, "norm": "group"}, 1, 3)
    assert d(torch.randn(1, 1, 32, 32, 32)).shape == (1, 1, 6, 6, 6)
    with pytest.raises(ValueError, match="R1"):
        build_discriminator({"norm": "batch", "r1_weight": 10.0}, 3, 2)
    d = build_discriminator({"ndf": 8, "r1_gamma": 1.0}, 3, 2)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    # R1 needs a gradient w.r.t. the input through the discriminator
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    (g,) = torch.autograd.grad(d(x).sum(), x, create_graph=True)
    g.square().sum().backward()


def test_channels_last_option_matches(grads_missing):
    torch.manual_seed(0)
    a = build_model(TINY).eval()
    b = build_model(dict(TINY, channels_last=True)).eval()
    b.load_state_dict(a.state_dict())
    assert b.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ra, rb = a(x, sample_posterior=False)[0], b(x, sample_posterior=False)[0]
    assert (ra - rb).abs().max() < 1e-4
    b.train()
    out = b.ae_forward(x)
    assert grads_missing(b, out.recon.mean() + out.posterior.kl().mean()) == []
