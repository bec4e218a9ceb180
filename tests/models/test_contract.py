"""Every model family is an `Autoencoder`: the one contract the trainer, evaluation and
sampling use (CONTRIBUTING.md), with nothing left unimplemented."""

from __future__ import annotations

import warnings

import pytest
import torch

from vaeflow.models import MODEL_REGISTRY, Autoencoder, build_model

BACKBONE = dict(in_channels=1, resolution=8, base_ch=8, ch_mult=[1, 2], num_res_blocks=1, norm_groups=4)
TINY = {
    "autoencoder_kl": dict(embed_dim=2, **BACKBONE),
    "vqvae": dict(codebook_size=16, embed_dim=4, **BACKBONE),
    "magvit": dict(quantizer="fsq", levels=[5, 3], **BACKBONE),
    "cnn_vae": dict(preset="mnist", image_size=8, hidden_dims=[8, 16], latent_dim=6),
}


def test_every_registered_family_has_a_tiny_case():
    assert set(TINY) == set(MODEL_REGISTRY)


@pytest.mark.parametrize("family", sorted(TINY))
def test_family_implements_the_contract(family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starts from scratch
        model = build_model({"type": family, **TINY[family]}).eval()
    assert isinstance(model, Autoencoder) and model.input_range in ("signed", "unit")
    x = torch.rand(3, 1, 8, 8) * (2 if model.input_range == "signed" else 1) - (1 if model.input_range == "signed" else 0)
    with torch.no_grad():
        out = model.ae_forward(x, sample_posterior=False)
        z = model.encode_latent(x)
        prior = model.sample_prior(3, generator=torch.Generator().manual_seed(0))
        decoded = model.decode_latent(prior)
    assert out.recon.shape == x.shape and decoded.shape == x.shape
    assert tuple(z.shape[1:]) == tuple(model.latent_shape) == tuple(prior.shape[1:])
    assert (out.posterior is None) == (out.reg_loss is not None)  # KL: a posterior; VQ: a codebook term
    assert set(model.parts()) == {"encoder", "decoder", "quantizer"}
    assert model.last_layer_weight().requires_grad
