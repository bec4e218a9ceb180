"""Each loss against a value computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vaeflow.losses import AdversarialLoss, KLLoss, ReconstructionLoss, adaptive_weight, hinge_d_loss, r1_penalty
from vaeflow.losses.kl import total_correlation


def test_reconstruction_losses_by_hand():
    recon = torch.tensor([[0.5, -0.5]])
    target = torch.tensor([[1.0, -1.0]])
    assert ReconstructionLoss("l1")(recon, target).item() == pytest.approx(0.5)
    assert ReconstructionLoss("mse")(recon, target).item() == pytest.approx(0.25)
    # bce on [0, 1]: p = (0.75, 0.25), t = (1, 0) -> -log 0.75 for both pixels
    assert ReconstructionLoss("bce")(recon, target).item() == pytest.approx(-math.log(0.75), rel=1e-5)
    # focal: (1 - p_t)^2 * bce with p_t = 0.75
    assert ReconstructionLoss("bce_focal", focal_gamma=2.0)(recon, target).item() == pytest.approx(
        0.25**2 * -math.log(0.75), rel=1e-5)
    unit = ReconstructionLoss("bce", signed=False)
    assert unit(torch.tensor([0.9]), torch.tensor([1.0])).item() == pytest.approx(-math.log(0.9), rel=1e-5)


def test_kl_value_warmup_annealing_and_free_bits():
    mean = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)]])
    # 0.5*(1 + 1 - 1 - 0) + 0.5*(0 + 4 - 1 - log 4)
    expected = 0.5 + 0.5 * (3 - math.log(4.0))
    kl, raw = KLLoss()(mean, logvar)
    assert kl.item() == pytest.approx(expected, rel=1e-6) and raw.item() == pytest.approx(expected, rel=1e-6)
    warm = KLLoss(kl_beta=0.1, warmup_steps=100)
    assert [warm.beta(s) for s in (0, 50, 100, 500)] == pytest.approx([0.0, 0.05, 0.1, 0.1])
    anneal = KLLoss(beta_start=0.0, beta_end=4.0, beta_steps=1000)
    assert [anneal.beta(s) for s in (0, 250, 1000, 2000)] == pytest.approx([0.0, 1.0, 4.0, 4.0])
    # free bits: dimension 0 has KL 0.5, dimension 1 has 0.807; floor at 0.7 nats
    fb, raw = KLLoss(free_bits=0.7)(mean, logvar)
    assert fb.item() == pytest.approx(0.7 + 0.5 * (3 - math.log(4.0)), rel=1e-6)
    assert raw.item() == pytest.approx(expected, rel=1e-6)
    # spatial latents: free bits per channel, summed over positions
    m4 = torch.zeros(2, 3, 2, 2)
    assert KLLoss(free_bits=0.25)(m4, torch.zeros_like(m4))[0].item() == pytest.approx(0.75)


def test_total_correlation_matches_the_minibatch_weighted_formula_by_loops():
    torch.manual_seed(0)
    b, d, n = 3, 2, 100
    mean, logvar, z = torch.randn(b, d), torch.randn(b, d) * 0.3, torch.randn(b, d)

    def log_q(i, j, dims):  # log q(z_i[dims] | x_j), diagonal Gaussian
        return sum(
            -0.5 * (math.log(2 * math.pi) + logvar[j, k].item() + (z[i, k] - mean[j, k]).item() ** 2 / math.exp(logvar[j, k].item()))
            for k in dims
        )

    def lse(xs):
        m = max(xs)
        return m + math.log(sum(math.exp(x - m) for x in xs))

    expected = 0.0
    for i in range(b):
        log_qz = lse([log_q(i, j, range(d)) for j in range(b)]) - math.log(b * n)
        log_prod = sum(lse([log_q(i, j, [k]) for j in range(b)]) - math.log(b * n) for k in range(d))
        expected += (log_qz - log_prod) / b
    assert total_correlation(z, mean, logvar, dataset_size=n).item() == pytest.approx(expected, rel=1e-5)


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([0.5, 2.0]), torch.tensor([-2.0, 0.0])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.375)
    adv = AdversarialLoss(lambda_adv=0.5, disc_start=10, adaptive=False)
    assert not adv.active(9) and adv.active(10)
    disc = lambda x: x.mean(dim=1)
    loss, g, w = adv.generator(disc, torch.tensor([[1.0, 3.0]]))
    assert g.item() == pytest.approx(-2.0) and loss.item() == pytest.approx(-1.0) and w.item() == 1.0


def test_r1_penalty_by_hand():
    disc = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        disc.weight.copy_(torch.tensor([[1.0, 2.0, 2.0]]))
    x = torch.randn(4, 3)
    # grad_x D = w for every sample, ||w||^2 = 9; gamma/2 * 9
    assert r1_penalty(disc, x, gamma=2.0).item() == pytest.approx(9.0)


def test_adaptive_weight_is_gradient_norm_ratio():
    w = nn.Parameter(torch.tensor([1.0, 1.0]))
    nll = (3 * w).sum()  # grad = (3, 3), norm 3*sqrt(2)
    g = (w * torch.tensor([1.0, 0.0])).sum()  # grad = (1, 0), norm 1
    assert adaptive_weight(nll, g, w).item() == pytest.approx(3 * math.sqrt(2) / (1 + 1e-4), rel=1e-5)
    assert adaptive_weight(nll, g, w, max_weight=2.0).item() == pytest.approx(2.0)
