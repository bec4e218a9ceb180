import pytest
import torch

from vaeflow.models import build_model
from vaeflow.models.cnn_vae import CelebaVAE, MnistVAE, VAEBase, VAELoss



@pytest.mark.parametrize("preset,shape,rng", [("mnist", (4, 1, 28, 28), "unit"),
                                              ("celeba", (2, 3, 64, 64), "signed")])
def test_vae_base_interface(preset, shape, rng, grads_missing):
    torch.manual_seed(0)
    model = build_model({"type": "cnn_vae", "preset": preset, "latent_dim": 8,
                         "hidden_dims": [8, 16, 32, 32]})
    assert isinstance(model, VAEBase) and isinstance(model, MnistVAE if preset == "mnist" else CelebaVAE)
    assert model.input_range == rng
    x = torch.rand(shape) if rng == "unit" else torch.rand(shape) * 2 - 1
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (shape[0], 8)
    z = model.reparameterize(mu, logvar)
    assert model.decode(z).shape == shape
    recon, mu, logvar = model(x)
    assert recon.shape == shape
    if preset == "mnist":
        assert recon.min() >= 0 and recon.max() <= 1
    else:
        assert recon.abs().max() <= 1
    target = x if rng == "unit" else x
    losses = model.compute_loss(recon, target, mu, logvar)
    assert isinstance(losses, VAELoss) and torch.isfinite(losses.loss)
    assert torch.allclose(losses.loss, losses.recon + model.beta * losses.kl)
    assert grads_missing(model, losses.loss) == []
    model.eval()
    assert model.sample(3).shape == (3, *shape[1:])
    assert model.reconstruct(x).shape == shape
    # vaeflow contract
    out = model.ae_forward(x, sample_posterior=False)
    assert out.recon.shape == shape and out.reg_loss is None
    assert torch.equal(out.posterior.mode(), model.encode_latent(x))
    assert model.latent_shape == (8,)
    assert model.sample_prior(5).shape == (5, 8)
    assert model.decode_latent(model.sample_prior(2)).shape == (2, *shape[1:])
    assert set(model.parts()) == {"encoder", "decoder", "quantizer"}
    assert model.last_layer_weight().shape[0] == shape[1]


def test_defaults_and_overrides():
    m = build_model({"type": "cnn_vae"})  # mnist preset by default
    assert m.latent_dim == 128 and m.recon_loss == "bce" and m.image_size == (28, 28)
    c = build_model({"type": "cnn_vae", "preset": "celeba", "image_size": 32, "batchnorm": False})
    assert isinstance(c.pool, torch.nn.AdaptiveAvgPool2d)
    assert c(torch.randn(1, 3, 32, 32))[0].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown model option"):
        build_model({"type": "cnn_vae", "preset": "mnist", "bogus": 1})
