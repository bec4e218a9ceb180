import pytest
import torch

from vaeflow.models import build_model
from vaeflow.models.blocks import AttnBlock, CausalConv3d, Downsample
from vaeflow.models.quantizers import FSQ, LFQ, VectorQuantizer



def test_vq_straight_through_and_nearest_code():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, beta=0.25, ema=False).train()
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    zq, loss, info = vq(z)
    # forward value: the nearest codebook vector at every position
    flat = z.detach().movedim(1, -1).reshape(-1, 3)
    nearest = torch.cdist(flat, vq.codebook.detach()).argmin(1)
    assert torch.equal(info["indices"].reshape(-1), nearest)
    assert torch.allclose(zq.detach().movedim(1, -1).reshape(-1, 3), vq.codebook.detach()[nearest],
                          atol=1e-6)
    # backward: identity to the encoder output
    (zq * torch.arange(3.0).view(1, 3, 1, 1)).sum().backward()
    assert torch.allclose(z.grad, torch.arange(3.0).view(1, 3, 1, 1).expand_as(z))
    # codebook + commitment: the codebook learns by gradient when ema=False
    z2 = torch.randn(2, 3, 4, 4, requires_grad=True)
    _, loss, _ = vq(z2)
    loss.backward()
    assert vq.embedding.weight.grad is not None and z2.grad.abs().sum() > 0
    assert {"perplexity", "usage"} <= set(info) and 1.0 <= info["perplexity"] <= 8.0


def test_vq_ema_update_matches_formula():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, ema=True, decay=0.9, eps=1e-5, dead_code_threshold=0.0)
    codes = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]])
    vq.embed.copy_(codes)
    vq.embed_sum.copy_(codes)
    vq.cluster_size.fill_(1.0)
    z = torch.tensor([[0.5, 0.1], [0.3, -0.1], [4.0, 4.0]]).t().reshape(1, 2, 3, 1)
    vq.eval()
    vq(z)
    assert torch.equal(vq.embed, codes)  # eval: no update
    vq.train()
    _, loss, info = vq(z)
    assert not any(p.requires_grad for p in vq.parameters())  # EMA codebook is a buffer
    counts = torch.tensor([2.0, 1.0, 0.0, 0.0])
    sums = torch.stack([torch.tensor([0.8, 0.0]), torch.tensor([4.0, 4.0]), torch.zeros(2), torch.zeros(2)])
    cs = 0.9 * torch.ones(4) + 0.1 * counts
    es = 0.9 * codes + 0.1 * sums
    n = cs.sum()
    expect = es / ((cs + 1e-5) / (n + 4 * 1e-5) * n)[:, None]
    assert torch.allclose(vq.cluster_size, cs) and torch.allclose(vq.embed, expect, atol=1e-6)
    assert info["usage"] == 0.5


def test_vq_dead_code_restart():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 2, ema=True, dead_code_threshold=1.0).train()
    vq.embed.fill_(100.0)  # far from the data: every code is dead after the first update
    z = torch.randn(4, 2, 8, 8) * 0.1 + 3.0
    vq(z)
    data = z.movedim(1, -1).reshape(-1, 2)
    d = torch.cdist(vq.embed, data).min(1).values
    assert (d < 0.1).all()  # every code was restarted from (jittered) encoder outputs
    _, _, info = vq(z)
    assert info["usage"] > 0.5


def test_lfq_bits_entropy_and_straight_through():
    torch.manual_seed(0)
    q = LFQ(16, inv_temperature=1.0).train()
    z = torch.randn(3, 4, 5, 5, requires_grad=True)
    zq, loss, info = q(z)
    assert set(zq.detach().unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(torch.sign(z.detach()).clamp_min(-1).where(z.detach() != 0, -1), zq.detach())
    assert torch.equal(q.codes_to_latent(info["indices"]), zq.detach())
    zq.sum().backward(retain_graph=True)
    assert torch.allclose(z.grad, torch.ones_like(z))
    # exact entropies vs the bit-factorised ones: per-sample identical, codebook an upper bound
    flat = z.detach().movedim(1, -1).reshape(-1, 4)
    exact = q.entropy_terms(flat)
    q.exact_entropy_max = 0
    fact = q.entropy_terms(flat)
    assert torch.allclose(exact[0], fact[0], atol=1e-5)
    assert fact[1] >= exact[1] - 1e-5
    assert {"per_sample_entropy", "codebook_entropy", "perplexity", "usage"} <= set(info)
    with pytest.raises(ValueError):
        LFQ(100)


def test_fsq_levels_and_indices():
    torch.manual_seed(0)
    q = FSQ((8, 5, 3))
    assert q.codebook_size == 120 and q.code_dim == 3
    z = torch.randn(2, 3, 6, 6, requires_grad=True) * 3
    z.retain_grad()
    zq, loss, info = q(z)
    assert float(loss) == 0.0
    assert zq.abs().max() <= 1.0
    assert torch.allclose(q.codes_to_latent(info["indices"]), zq.detach())
    assert info["indices"].max() < 120 and info["indices"].min() >= 0
    # every channel takes at most `levels` values
    for c, lv in enumerate((8, 5, 3)):
        assert zq[:, c].detach().unique().numel() <= lv
    zq.sum().backward()
    assert z.grad.abs().sum() > 0


TINY = dict(resolution=16, base_ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)


@pytest.mark.parametrize("cfg", [
    dict(type="vqvae", codebook_size=32, embed_dim=4),
    dict(type="vqvae", codebook_size=32, embed_dim=4, ema=False),
    dict(type="magvit", quantizer="lfq", codebook_size=64),
    dict(type="magvit", quantizer="fsq", levels=(5, 5, 5)),
    dict(type="magvit", quantizer="lfq", codebook_size=16, spatial_dims=3, in_channels=1,
         attn_resolutions=(8,)),
], ids=["vq_ema", "vq_grad", "lfq", "fsq", "lfq_3d_causal"])
def test_vq_models_contract(cfg, grads_missing):
    torch.manual_seed(0)
    model = build_model({**TINY, **cfg})
    dims = cfg.get("spatial_dims", 2)
    x = torch.randn(2, cfg.get("in_channels", 3), *([16] * dims))
    out = model.ae_forward(x)
    assert out.posterior is None and out.reg_loss.ndim == 0
    assert out.recon.shape == x.shape
    assert {"perplexity", "usage"} <= set(out.stats)
    assert all(isinstance(v, float) for v in out.stats.values())
    assert grads_missing(model, out.recon.square().mean() + out.reg_loss) == []
    z = model.encode_latent(x)
    assert z.shape == (2, *model.latent_shape)
    assert model.decode_latent(model.sample_prior(2)).shape == x.shape
    assert model.parts()["quantizer"] == [model.quantize]
    assert model.last_layer_weight() is model.decoder.conv_out.weight
    assert model.input_range == "signed"
    if dims == 3:
        assert isinstance(model.encoder.conv_in, CausalConv3d)


def test_magvit_rejects_mismatched_options():
    with pytest.raises(ValueError, match="code dimension"):
        build_model({**TINY, "type": "magvit", "quantizer": "fsq", "levels": (5, 5), "embed_dim": 4})
    with pytest.raises(ValueError, match="unknown model option"):
        build_model({**TINY, "type": "magvit", "quantizer": "lfq", "bogus": 1})
    with pytest.raises(ValueError, match="unknown model option"):
        build_model({**TINY, "type": "vqvae", "bogus": 1})


def test_causal_blocks_ignore_later_slices():
    torch.manual_seed(0)
    conv = CausalConv3d(2, 3, 3, 1, 1)
    down = Downsample(2, dims=3, causal=True)
    attn = AttnBlock(2, dims=3, norm_groups=1, causal=True)
    x = torch.randn(1, 2, 8, 4, 4)
    y = x.clone()
    y[:, :, 5:] = torch.randn_like(y[:, :, 5:])  # change slices >= 5
    assert conv(x).shape == (1, 3, 8, 4, 4)
    assert torch.equal(conv(x)[:, :, :5], conv(y)[:, :, :5])
    assert down(x).shape == (1, 2, 4, 2, 2)
    assert torch.equal(down(x)[:, :, :3], down(y)[:, :, :3])  # output t sees inputs 2t-2..2t
    # attention: queries at t < 5 only attend to keys at t' <= t (norm stats aside)
    attn.norm = torch.nn.Identity()
    assert torch.allclose(attn(x)[:, :, :5], attn(y)[:, :, :5])


def test_latent_shape_matches_encoder_for_odd_sizes():
    torch.manual_seed(0)
    m = build_model({**TINY, "type": "magvit", "quantizer": "fsq", "levels": (3, 3),
                     "spatial_dims": 3, "in_channels": 1, "resolution": (9, 12, 10)})
    assert m.latent_shape == (2, 5, 6, 5)
    with torch.no_grad():
        assert m.encode_latent(torch.randn(1, 1, 9, 12, 10)).shape == (1, *m.latent_shape)
    v = build_model({**TINY, "type": "vqvae", "codebook_size": 8, "resolution": (15, 17)})
    assert v.latent_shape == (4, 7, 8)
    with torch.no_grad():
        assert v.encode_latent(torch.randn(1, 3, 15, 17)).shape == (1, *v.latent_shape)
