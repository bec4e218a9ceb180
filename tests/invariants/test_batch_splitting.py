"""Splitting a batch changes no gradient: into micro-batches (any count, sizes that do not
divide included), and into a gradient-accumulation window (short final windows included).

Noise is fixed by construction: posterior noise is keyed by each sample's dataset index
(trainer/noise.py), so the same sample draws the same eps in any split. Options whose
loss is not a mean over images (BatchNorm, the adaptive GAN weight, free bits, the TC
estimator, LFQ's batch entropy) are listed, with the reason, in test_option_coverage.py.
"""

from __future__ import annotations

import pytest

from invariants.trainers import WITHOUT_BATCHNORM, assert_close, batch, grads, trainer

GAN = dict(gan_training=True, lambda_adv=0.5, adaptive_weight=False, lambda_lecam=0.1, r1_gamma=1.0)


def one_batch(t, n: int, micro: int) -> dict:
    rows, x = batch(t, n)
    t.state.micro = micro
    t.train_step(x, t.state, True, 1, rows)
    return grads(t)


# (batch, micro): 6/4 gives 3 chunks of 2, 10/4 gives [3, 3, 3, 1] (the two measured defects)
SPLITS = [(6, 4), (10, 4), (7, 2)]


@pytest.mark.parametrize("family", WITHOUT_BATCHNORM)
def test_micro_batches_give_the_batch_gradient(tmp_path, family):
    t = trainer(tmp_path, family)
    for n, micro in SPLITS:
        assert_close(one_batch(t, n, micro), one_batch(t, n, 1), what=f"{family} batch {n} in {micro}")


@pytest.mark.parametrize("recon", ["l1", "mse"])
def test_micro_batches_gan_stage(tmp_path, recon):
    """Generator and discriminator gradients, with R1, LeCAM and posterior sampling."""
    t = trainer(tmp_path, "kl", recon_type=recon, **GAN)
    for n, micro in SPLITS[:3]:
        got, ref = one_batch(t, n, micro), one_batch(t, n, 1)
        assert any(k.startswith("D.") for k in ref), "the discriminator trained"
        assert_close(got, ref, what=f"GAN batch {n} in {micro}")


@pytest.mark.parametrize("recon", ["bce", "bce_focal"])
def test_micro_batches_unit_range_losses(tmp_path, recon):
    t = trainer(tmp_path, "cnn", recon_type=recon)
    assert_close(one_batch(t, 10, 4), one_batch(t, 10, 1), what=recon)


def window_grads(tmp_path, family: str, accum: int, batches: int, b: int, **step) -> dict:
    """Gradients of one accumulation window of `batches` batches of b images (a full window
    when batches == accum, the epoch's short last window when fewer)."""
    t = trainer(tmp_path, family, grad_accum_steps=accum, **step)
    for j in range(batches):
        rows, x = batch(t, b, j * b)
        t.train_step(x, t.state, j == batches - 1, batches, rows)
    return grads(t)


@pytest.mark.parametrize("family", WITHOUT_BATCHNORM)
@pytest.mark.parametrize("accum,batches", [(3, 3), (4, 1), (4, 2)])
def test_accumulation_equals_the_large_batch(tmp_path, family, accum, batches):
    got = window_grads(tmp_path / "k", family, accum, batches, 4)
    ref = window_grads(tmp_path / "one", family, 1, 1, 4 * batches)
    assert_close(got, ref, what=f"{family}: {batches} batch(es) of 4 in a window of {accum}")


def test_accumulation_gan_stage(tmp_path):
    got = window_grads(tmp_path / "k", "kl", 2, 2, 4, **GAN)
    ref = window_grads(tmp_path / "one", "kl", 1, 1, 8, **GAN)
    assert_close(got, ref, what="GAN window of 2")
