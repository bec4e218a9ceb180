"""The non-finite guard, the VAEFLOW_FAULT parser, LeCAM and the fp32 parts, as units."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vaeflow.config import ConfigError
from vaeflow.losses import KLLoss, LeCAM, adaptive_weight, r1_penalty
from vaeflow.losses.adversarial import AdversarialLoss
from vaeflow.trainer import faults
from vaeflow.trainer.guard import Policy, StepGuard, all_finite, scale_learning_rates
from vaeflow.trainer.state import TrainState


# ---------------------------------------------------------------- VAEFLOW_FAULT
def test_fault_hook_unset_or_empty_is_none():
    assert faults.from_env(environ={}) is None
    assert faults.from_env(environ={"VAEFLOW_FAULT": "  "}) is None


def test_fault_grammar():
    plan = faults.from_env(environ={"VAEFLOW_FAULT": "nan@step:5,6,7; grad-nan@step:9:stage=vae_gan:always"})
    nan, grad = plan.faults
    assert (nan.kind, sorted(nan.steps), nan.stage, nan.when) == ("nan", [5, 6, 7], None, "rollbacks=0")
    assert (grad.kind, sorted(grad.steps), grad.stage, grad.when) == ("grad-nan", [9], "vae_gan", "always")
    assert "nan at step 5,6,7" in plan.describe() and "(always)" in plan.describe()


def test_when_a_fault_fires():
    by_default, once, always, later = faults.FaultPlan.parse(
        "nan@step:5;nan@step:5:once;nan@step:5:always;kill@step:5:rollbacks=2").faults
    # (step, rollbacks, consecutive skips) -> fires?
    assert by_default.fires(5, 0, 0) and by_default.fires(5, 0, 2) and not by_default.fires(5, 1, 0)
    assert not by_default.fires(6, 0, 0)
    assert once.fires(5, 0, 0) and not once.fires(5, 0, 1) and not once.fires(5, 1, 0)
    assert always.fires(5, 7, 3)
    assert later.fires(5, 2, 0) and not later.fires(5, 1, 0)
    ranked = faults.FaultPlan.parse("nan@step:5:rank=1").faults[0]
    assert not ranked.fires(5, 0, 0)  # this process is rank 0 (RANK unset)
    text = "nan@step:5:stage=vae_gan;inf@step:7"
    assert [f.kind for f in faults.from_env("vae_gan", {"VAEFLOW_FAULT": text}).faults] == ["nan", "inf"]
    assert [f.kind for f in faults.from_env("vae_warmup", {"VAEFLOW_FAULT": text}).faults] == ["inf"]


@pytest.mark.parametrize("text", ["nan", "nan@5", "nan@step:", "nan@step:x", "boom@step:3", "nan@step:0",
                                  "nan@step:3:sometimes", "nan@step:3:stage=", "nan@step:3:rollbacks=x"])
def test_bad_fault_spec_is_one_clear_error(text):
    with pytest.raises(ConfigError, match="VAEFLOW_FAULT") as err:
        faults.from_env(environ={"VAEFLOW_FAULT": text})
    assert "KIND@step:N" in str(err.value) or "count from 1" in str(err.value)


def test_fault_corrupts_the_loss_and_its_gradients_only_at_its_step():
    plan = faults.FaultPlan.parse("nan@step:3;inf@step:4")
    w = nn.Parameter(torch.ones(3))
    loss = (w * 2).sum()
    assert torch.equal(plan.corrupt_loss(loss, TrainState(global_step=1)), loss)  # attempting step 2
    assert torch.isinf(plan.corrupt_loss(loss, TrainState(global_step=3)))
    bad = plan.corrupt_loss(loss, TrainState(global_step=2))
    bad.backward()
    assert torch.isnan(bad) and torch.isnan(w.grad).all()


def test_grad_fault_leaves_the_loss_finite():
    plan = faults.FaultPlan.parse("grad-nan@step:2")
    w = nn.Parameter(torch.ones(3))
    (w * 2).sum().backward()
    plan.at_step([w], TrainState(global_step=0))
    assert torch.isfinite(w.grad).all()
    plan.at_step([w], TrainState(global_step=1))
    assert torch.isnan(w.grad[0]) and torch.isfinite(w.grad[1:]).all()


# ---------------------------------------------------------------- the guard
def _param(grad):
    p = nn.Parameter(torch.zeros(len(grad)))
    p.grad = torch.tensor(grad)
    return p


def test_guard_flags_a_bad_loss_or_bad_gradients():
    g = StepGuard(Policy())
    cpu = torch.device("cpu")
    g.observe(torch.tensor(1.0), None)
    assert g.check([_param([1.0, 2.0])], cpu) is None
    g.observe(torch.tensor(1.0), torch.tensor(float("nan")))
    assert g.check([_param([1.0, 2.0])], cpu) == "loss"
    assert g.check([_param([1.0, float("inf")])], cpu) == "gradients"  # window reset: loss flag gone
    assert g.check([_param([1.0]), nn.Parameter(torch.zeros(2))], cpu) is None  # params without grads are fine


def test_guard_with_a_grad_scaler_leaves_inf_gradients_to_it():
    g = StepGuard(Policy(), scaler_enabled=True)
    cpu = torch.device("cpu")
    g.observe(torch.tensor(3.0))
    assert g.check([_param([float("inf")])], cpu) is None  # the scaler's overflow, not a fault
    g.observe(torch.tensor(float("inf")))
    assert g.check([_param([1.0])], cpu) == "loss"  # a non-finite loss is, scaler or not


def test_guard_counts_rollbacks_and_backoff():
    g = StepGuard(Policy(max_consecutive=2, lr_backoff=0.5, max_rollbacks=2))
    st = TrainState()
    g.skip(st)
    assert not g.wants_rollback(st)
    g.passed(st)
    g.skip(st), g.skip(st)
    assert g.wants_rollback(st) and g.can_roll_back(st) and st.skipped == 3
    restored = TrainState()  # the checkpoint's state: no skips, no rollbacks yet
    assert g.rolled_back(restored, st, checkpoint_rollbacks=0) == 0.5
    assert (restored.skipped, restored.consecutive_skips, restored.rollbacks) == (3, 0, 1)
    # a second rollback to the same (older) checkpoint: two backoffs relative to it
    again = TrainState()
    assert g.rolled_back(again, restored, checkpoint_rollbacks=0) == 0.25
    assert not g.can_roll_back(again)


def test_scale_learning_rates_keeps_schedules_consistent():
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([w], lr=1e-2)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=1e-3)
    ref_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=5e-3)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=4, eta_min=5e-4)
    scale_learning_rates([opt], [sch], 0.5)
    for _ in range(3):
        opt.step(), sch.step(), ref_opt.step(), ref.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])


def test_all_finite_sees_parameters_and_buffers():
    m = nn.BatchNorm1d(3)
    assert all_finite([m, None])
    m.running_var[1] = float("inf")
    assert not all_finite([m])


# ---------------------------------------------------------------- GAN pieces
def test_gan_start_defaults_to_disc_start_and_separates_the_two():
    adv = AdversarialLoss(disc_start=5)
    assert adv.gan_start == 5
    adv = AdversarialLoss(disc_start=5, gan_start=8)
    assert adv.active(5) and not adv.generator_active(7) and adv.generator_active(8)


def test_lecam_by_hand_and_commit_discard():
    lc = LeCAM(decay=0.5)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -3.0])
    assert lc(real, fake).item() == 0.0  # no averages yet
    lc.discard()
    lc.commit()
    assert not bool(lc.initialized)  # a discarded (skipped) step changes nothing
    lc(real, fake)
    lc.commit()
    assert lc.ema_real.item() == 2.0 and lc.ema_fake.item() == -2.0
    # relu(real - ema_fake)^2 mean + relu(ema_real - fake)^2 mean
    r, f = torch.tensor([0.0, -3.0]), torch.tensor([1.0, 4.0])
    expected = ((2.0**2 + 0.0) / 2) + ((1.0**2 + 0.0) / 2)
    assert lc(r, f).item() == pytest.approx(expected)
    lc.commit()
    assert lc.ema_real.item() == pytest.approx(0.5 * 2.0 + 0.5 * -1.5)


def test_lecam_enters_the_discriminator_loss():
    disc = nn.Linear(2, 1)
    with torch.no_grad():
        disc.weight.fill_(1.0), disc.bias.zero_()
    x, y = torch.randn(4, 2), torch.randn(4, 2)
    plain, _ = AdversarialLoss(lambda_lecam=0.0).discriminator(disc, x, y)
    adv = AdversarialLoss(lambda_lecam=10.0)
    adv.discriminator(disc, x, y)
    adv.lecam.commit()
    with_reg, hinge = adv.discriminator(disc, x + 5, y - 5)  # real logits far above the fake average
    assert with_reg.item() > hinge.item() + 1.0
    assert plain.item() == pytest.approx(AdversarialLoss().discriminator(disc, x, y)[0].item())


def test_adaptive_weight_scale_invariant_and_safe():
    w = nn.Parameter(torch.tensor([1.0, 1.0]))
    nll = (3 * w).sum()
    g = (w * torch.tensor([1.0, 0.0])).sum()
    plain = adaptive_weight(nll, g, w).item()
    scaled = adaptive_weight(nll, g, w, scale=lambda t: t * 65536.0).item()
    assert scaled == pytest.approx(plain, rel=1e-6)
    overflow = adaptive_weight(nll, g, w, scale=lambda t: t * float("inf")).item()
    assert overflow == 0.0  # non-finite ratio: weight 0, the loss stays finite


# ---------------------------------------------------------------- precision per part
bf16_cpu = pytest.mark.skipif(not torch.amp.autocast_mode.is_autocast_available("cpu"), reason="no CPU autocast")


@bf16_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_r1_adaptive_weight_and_lecam_are_fp32_under_autocast(dtype):
    torch.manual_seed(0)
    mean, logvar = torch.randn(4, 8), torch.randn(4, 8)
    ref_kl = KLLoss(1.0)(mean, logvar)[0]
    conv = nn.Conv2d(1, 1, 3, padding=1)
    x = torch.rand(2, 1, 8, 8)
    ref_r1 = r1_penalty(conv, x, 1.0)
    w = nn.Parameter(torch.randn(16, 16))
    inp = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=dtype):
        kl = KLLoss(1.0)(mean.to(dtype), logvar.to(dtype))[0]
        r1 = r1_penalty(conv, x, 1.0)
        out = inp @ w  # low precision, as a decoder's last layer under autocast
        weight = adaptive_weight(out.float().pow(2).mean(), out.float().mean(), w)
        pen = LeCAM()(out, out)
    assert kl.dtype == r1.dtype == weight.dtype == pen.dtype == torch.float32
    assert torch.allclose(kl, KLLoss(1.0)(mean.to(dtype).float(), logvar.to(dtype).float())[0])
    assert torch.allclose(r1, ref_r1)
    assert math.isfinite(weight.item()) and math.isfinite(ref_kl.item())
