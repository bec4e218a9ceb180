"""The non-finite guard inside real training runs (tiny config, CPU), driven by VAEFLOW_FAULT."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from support import TINY
from vaeflow import checkpoint as ckpt
from vaeflow import config as cfg
from vaeflow.data import prepare_dataset
from vaeflow.trainer import run_stage
from vaeflow.trainer.guard import NonFiniteError

GAN = {"gan_training": True, "lambda_adv": 0.1}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    prepare_dataset(yaml.safe_load(TINY.read_text())["data"], root / "data")
    return root


def one_stage(results, data_dir, training=None, **step):
    """A single GAN stage of 2 epochs x 6 batches, a resume checkpoint every 2 steps."""
    raw = yaml.safe_load(TINY.read_text())
    raw["training"].update(training or {})
    raw["training"]["pipeline"]["steps"] = [{"name": "s", "n_epochs": 2, **GAN, **step}]
    config = cfg.validate(raw)
    results.mkdir(parents=True, exist_ok=True)
    (results / "data").symlink_to(data_dir / "data")
    summary = run_stage(config, "s", results)
    return summary, ckpt.load_vaeflow(results / "s" / "last.pt")


def records(results, split, running=False):
    lines = (results / "s" / ("running" if running else "") / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def test_nan_step_is_skipped_then_rolled_back_with_lr_backoff(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("VAEFLOW_FAULT", "nan@step:5")
    summary, last = one_stage(tmp_path, data_dir)
    out = capsys.readouterr().out
    events = records(tmp_path, "event")
    assert [e["event"] for e in events] == ["nonfinite_skip"] * 3 + ["nonfinite_rollback"]
    assert [e["details"]["step"] for e in events[:3]] == [5, 5, 5]
    assert [e["details"]["consecutive"] for e in events[:3]] == [1, 2, 3]
    rollback = events[3]["details"]
    assert rollback["to_step"] == 4 and rollback["lr_factor"] == 0.5 and rollback["checkpoint"].endswith("s/running/last.pt")
    assert out.count("Non-finite loss at stage s, optimizer step 5") == 3
    assert "Rolled back to " in out and "learning rates x0.5" in out and "3 non-finite steps skipped, 1 rollback" in out
    # 12 batches, 3 skipped, 1 batch replayed after the rollback to the epoch-1 checkpoint (step 4)
    assert summary["global_step"] == last["global_step"] == 10
    assert summary["nonfinite_skipped"] == 3 and summary["rollbacks"] == 1
    assert (last["skipped"], last["consecutive_skips"], last["rollbacks"]) == (3, 0, 1)
    for key in ("model", "ema", "discriminator"):
        assert all_finite(last[key]), key
    lrs = [g["lr"] for o in ("vae", "discriminator") for g in last["optimizers"][o]["param_groups"]]
    assert lrs == pytest.approx([0.5e-3, 0.5e-4])
    # the skipped steps' NaN losses stay out of the logged means
    assert all(all(v == v for v in r["metrics"].values()) for r in records(tmp_path, "train") + records(tmp_path, "val"))


def test_without_the_hook_no_code_path_changes(tmp_path, data_dir, monkeypatch):
    """Unset, and armed for a step the stage never reaches: bit-identical results."""
    monkeypatch.delenv("VAEFLOW_FAULT", raising=False)
    _, plain = one_stage(tmp_path / "plain", data_dir)
    monkeypatch.setenv("VAEFLOW_FAULT", "nan@step:1000")
    _, armed = one_stage(tmp_path / "armed", data_dir)
    for key in ("model", "ema", "discriminator"):
        assert all(torch.equal(plain[key][k], armed[key][k]) for k in plain[key]), key
    assert plain["global_step"] == armed["global_step"] == 12 and plain["skipped"] == 0
    assert not records(tmp_path / "plain", "event")


def test_one_bad_gradient_is_one_skip_and_no_rollback(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("VAEFLOW_FAULT", "grad-nan@step:3:once")
    summary, last = one_stage(tmp_path, data_dir)
    events = records(tmp_path, "event")
    assert [(e["event"], e["details"]["reason"]) for e in events] == [("nonfinite_skip", "gradients")]
    assert "Non-finite gradients at stage s, optimizer step 3" in capsys.readouterr().out
    assert summary["global_step"] == 11 and summary["rollbacks"] == 0 and all_finite(last["model"])


def test_a_fault_that_persists_stops_after_max_rollbacks(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("VAEFLOW_FAULT", "nan@step:3:always")
    with pytest.raises(NonFiniteError) as err:
        one_stage(tmp_path, data_dir, training={"nonfinite": {"max_consecutive": 2, "max_rollbacks": 2}})
    msg = str(err.value)
    assert "training diverged: 2 non-finite steps in a row (loss) at stage s, optimizer step 3" in msg
    assert "after 2 rollback(s) to " in msg and "s/running/last.pt (step 2)" in msg and "max_rollbacks=2 reached" in msg
    assert "\n" not in msg
    events = [e["event"] for e in records(tmp_path, "event", running=True)]
    assert events.count("nonfinite_rollback") == 2 and events[-1] == "nonfinite_stop"
    st = ckpt.load_vaeflow(tmp_path / "s" / "running" / "last.pt")  # kept for a rerun
    assert all_finite(st["model"])


def test_gan_start_after_disc_start_lets_the_discriminator_warm_up(tmp_path, data_dir):
    _, last = one_stage(tmp_path, data_dir, training={"log_every": 1}, disc_start=0, gan_start=4,
                        adaptive_weight_max=0.05, disc_lr_mult=3.0, lambda_lecam=0.1)
    train = {r["global_step"]: r["metrics"] for r in records(tmp_path, "train")}
    # the log line of step k describes the batch trained at global_step k - 1
    assert all("d_loss" in m for m in train.values())
    assert not any("g_loss" in train[k] for k in (1, 2, 3, 4)) and all("g_loss" in train[k] for k in (5, 6, 12))
    assert all(0 < train[k]["adv_weight"] <= 0.05 * (1 + 1e-6) for k in range(5, 13))  # fp32 0.05
    assert [g["lr"] for g in last["optimizers"]["discriminator"]["param_groups"]] == pytest.approx([3e-4])
    assert last["lecam"] is not None and bool(last["lecam"]["initialized"])


def test_gan_start_before_disc_start_is_a_config_error():
    raw = yaml.safe_load(TINY.read_text())
    raw["training"]["pipeline"]["steps"][1].update(disc_start=5, gan_start=2)
    with pytest.raises(cfg.ConfigError, match=r"training.pipeline.steps\[1\].gan_start: must be >= disc_start \(5\)"):
        cfg.validate(raw)


def test_guard_with_fp16_and_a_cpu_grad_scaler_counts_only_real_faults():
    """The trainer's decision rule with fp16 autocast and a GradScaler (its CPU flavour): the
    scaler's own overflow skips are left to it; an injected NaN loss is a fault."""
    from vaeflow.trainer.faults import FaultPlan
    from vaeflow.trainer.guard import Policy, StepGuard
    from vaeflow.trainer.state import TrainState

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows fp16 at first
    guard, plan, st = StepGuard(Policy(), scaler_enabled=True), FaultPlan.parse("nan@step:4:once"), TrainState()
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    scaler_skips = 0
    for _ in range(12):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        loss = plan.corrupt_loss(loss, st)
        guard.observe(loss)
        scaler.scale(loss).backward()
        if guard.check(list(model.parameters()), torch.device("cpu")) is not None:
            guard.skip(st)
            opt.zero_grad()
            continue
        guard.passed(st)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        scaler_skips += scaler.get_scale() < before
        opt.zero_grad()
        st.global_step += 1
    assert scaler_skips >= 1 and st.skipped == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not torch.amp.autocast_mode.is_autocast_available("cpu"), reason="no CPU autocast")
def test_bf16_autocast_on_cpu_recovers_from_an_injected_nan(tmp_path, data_dir, monkeypatch, capsys):
    """use_amp: bf16 on CPU: the whole stage (objective, guard, rollback, LeCAM, R1) under
    real bf16 autocast, with an injected NaN."""
    monkeypatch.setenv("VAEFLOW_FAULT", "nan@step:5")
    summary, last = one_stage(tmp_path / "bf16", data_dir, use_amp="bf16", r1_gamma=1.0, lambda_lecam=0.1)
    assert "bf16" in capsys.readouterr().out  # the stage says which precision it trains in
    assert summary["nonfinite_skipped"] == 3 and summary["rollbacks"] == 1
    for key in ("model", "ema", "discriminator"):
        assert all_finite(last[key]), key
    _, fp32 = one_stage(tmp_path / "fp32", data_dir, use_amp="fp32", r1_gamma=1.0, lambda_lecam=0.1)
    assert any(not torch.equal(last["model"][k], fp32["model"][k]) for k in fp32["model"])  # bf16 did run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fp16 autocast with the CUDA GradScaler)")
def test_fp16_grad_scaler_on_cuda_survives_an_injected_nan(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("VAEFLOW_FAULT", "nan@step:5")
    summary, last = one_stage(tmp_path, data_dir, training={"device": "cuda"}, use_amp=True, amp_dtype="fp16")
    assert last["scaler"]  # the GradScaler was on
    assert summary["nonfinite_skipped"] == 3 and summary["rollbacks"] == 1  # its own inf-skips are not counted
    for key in ("model", "ema", "discriminator"):
        assert all_finite(last[key]), key
