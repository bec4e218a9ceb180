"""vaeflow.metrics against hand-computed values and known identities."""

from __future__ import annotations

import math

import pytest
import torch

from vaeflow import metrics as M


def test_psnr_of_known_images():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.full((2, 1, 4, 4), 0.1)  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert M.mse_per_image(x, y).tolist() == pytest.approx([0.01, 0.01])
    assert M.psnr(0.01) == pytest.approx(20.0)
    assert M.psnr_per_image(x, y).tolist() == pytest.approx([20.0, 20.0])
    assert M.psnr(0.25, data_range=1.0) == pytest.approx(10 * math.log10(4))
    assert M.psnr(0.0) == math.inf
    assert M.l1_per_image(x, y).tolist() == pytest.approx([0.1, 0.1])


def test_ssim_identical_is_one_and_window_shrinks():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 1, 16, 16), (2, 3, 32, 24), (2, 1, 8, 8), (2, 1, 4, 16, 16)]:
        x = torch.rand(shape, generator=g)
        assert M.ssim_per_image(x, x).tolist() == pytest.approx([1.0] * shape[0])
    assert M.ssim_window_size(8, 8) == 7 and M.ssim_window_size(28, 28) == 11 and M.ssim_window_size(10, 64) == 9
    x = torch.rand(2, 1, 16, 16, generator=g)
    assert (M.ssim_per_image(x, 1 - x) < 0.5).all()


def test_ssim_matches_skimage():
    skm = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 20, generator=g)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ours = M.ssim_per_image(x, y)
    for i in range(2):
        ref = skm.structural_similarity(x[i].numpy(), y[i].numpy(), channel_axis=0, data_range=1.0,
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert float(ours[i]) == pytest.approx(ref, abs=1e-6)


def test_bernoulli_log_prob_hand_computed():
    x = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.8, 0.3]])
    expect = math.log(0.8) + math.log(0.7)
    assert float(M.bernoulli_log_prob(x, probs=p)) == pytest.approx(expect)
    assert float(M.bernoulli_log_prob(x, logits=torch.logit(p))) == pytest.approx(expect, rel=1e-6)
    # probabilities are clamped, so a confident wrong pixel costs log(1e-6), not -inf
    assert float(M.bernoulli_log_prob(x, probs=torch.tensor([[0.0, 0.0]]))) == pytest.approx(math.log(1e-6), rel=1e-4)


def test_gaussian_log_probs():
    x = torch.tensor([[0.5, 0.25]])
    mean = torch.tensor([[0.5, 0.5]])
    sigma = 0.1
    expect = sum(-0.5 * ((a - b) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
                 for a, b in [(0.5, 0.5), (0.25, 0.5)])
    assert float(M.gaussian_log_prob(x, mean, sigma)) == pytest.approx(expect)
    # discretized: the masses of all levels of one pixel sum to 1, so -log p >= 0
    bins = 4
    levels = torch.arange(bins, dtype=torch.float64).view(bins, 1) / (bins - 1)
    for mu in (0.0, 0.4, 0.9, 1.3):
        mass = M.discretized_gaussian_log_prob(levels, torch.full_like(levels, mu), 0.3, bins).exp()
        assert float(mass.sum()) == pytest.approx(1.0)
    # one level at the center with a tiny sigma: probability ~1
    assert float(M.discretized_gaussian_log_prob(torch.tensor([[2 / 3]]), torch.tensor([[2 / 3]]), 1e-3, bins)) == pytest.approx(0.0, abs=1e-9)


def test_likelihood_object_states_itself():
    with pytest.raises(ValueError, match="sigma"):
        M.Likelihood("gaussian")
    lik = M.Likelihood("discretized_gaussian", sigma=0.1, bins=256, sigma_source="fitted")
    d = lik.describe()
    assert d["kind"] == "discretized_gaussian" and d["sigma"] == 0.1 and d["bins"] == 256 and d["sigma_source"] == "fitted"
    assert M.Likelihood("bernoulli").describe()["kind"] == "bernoulli"


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    ref = torch.distributions.kl_divergence(q, p).sum(1)
    assert torch.allclose(M.kl_std_normal(mean, logvar).float(), ref, atol=1e-5)
    z = torch.randn(3, 5, generator=g)
    assert torch.allclose(M.log_normal_diag(z, mean, logvar).float(), q.log_prob(z).sum(1), atol=1e-5)
    assert torch.allclose(M.log_std_normal(z).float(), p.log_prob(z).sum(1), atol=1e-5)


def _linear_gaussian(s: float, x: torch.Tensor):
    """z ~ N(0, 1), x | z ~ N(z, s^2): log p(x) = log N(x; 0, 1 + s^2) exactly."""
    lik = M.Likelihood("gaussian", sigma=s)
    log_lik = M.decoder_log_lik(lambda z: z, lik, x)
    exact = -0.5 * (math.log(2 * math.pi * (1 + s * s)) + x.double().squeeze(1) ** 2 / (1 + s * s))
    return log_lik, exact


def test_iw_nll_exact_with_the_true_posterior():
    s = 0.5
    x = torch.tensor([[-1.0], [0.3], [2.0]])
    log_lik, exact = _linear_gaussian(s, x)
    post_mean = x / (1 + s * s)
    post_logvar = torch.full_like(x, math.log(s * s / (1 + s * s)))
    est = M.elbo_and_iw_nll(post_mean, post_logvar, log_lik, k=16, chunk=5, generator=torch.Generator().manual_seed(0))
    # with q = p(z|x) every importance weight equals p(x): the estimate is exact for any k
    assert torch.allclose(est["iw_nll"], -exact, atol=1e-9)
    assert torch.allclose(est["neg_elbo_mc"], -exact, atol=1e-9)


def test_iw_nll_below_neg_elbo_and_tightens_with_k():
    s = 0.5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, generator=g) * math.sqrt(1 + s * s)
    log_lik, exact = _linear_gaussian(s, x)
    mean = 0.5 * x  # a deliberately poor q(z|x)
    logvar = torch.full_like(x, math.log(0.6))
    est = {k: M.elbo_and_iw_nll(mean, logvar, log_lik, k=k, chunk=64, generator=torch.Generator().manual_seed(k))
           for k in (1, 10, 500)}
    true_nll = float(-exact.mean())
    # per image, with the same samples: IW bound <= that sample average ELBO (Jensen)
    for e in est.values():
        assert (e["iw_nll"] <= e["neg_elbo_mc"] + 1e-12).all()
    # on average: IW-NLL <= negative ELBO, approaching the true NLL from above as k grows
    assert float(est[500]["iw_nll"].mean()) <= float(est[500]["neg_elbo"].mean())
    assert float(est[10]["iw_nll"].mean()) < float(est[1]["iw_nll"].mean())
    assert true_nll - 0.01 <= float(est[500]["iw_nll"].mean()) < float(est[10]["iw_nll"].mean())
    assert float(est[500]["iw_nll"].mean()) == pytest.approx(true_nll, abs=0.02)
    # analytic-KL negative ELBO: recon + KL, and it is an upper bound of the true NLL
    assert float(est[500]["neg_elbo"].mean()) > true_nll


def test_bits_per_dim():
    assert M.bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)


def test_active_units_and_codebook_stats():
    rm = M.RunningMoments()
    g = torch.Generator().manual_seed(0)
    data = torch.randn(1000, 4, generator=g) * torch.tensor([1.0, 0.3, 0.05, 0.0])
    for chunk in data.split(100):
        rm.add(chunk)
    var = rm.variance()
    assert torch.allclose(var, data.double().var(0, unbiased=False), atol=1e-9)
    assert M.active_units(var, 0.01) == 2  # variances ~1, ~0.09, ~0.0025, 0
    stats = M.codebook_stats(torch.tensor([5, 5, 0, 0]))
    assert stats == {"codebook_size": 4, "codes_used": 2, "usage": 0.5, "perplexity": pytest.approx(2.0)}
    assert M.codebook_stats(torch.tensor([1, 1, 1, 1]))["perplexity"] == pytest.approx(4.0)
