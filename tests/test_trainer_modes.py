"""Each training mode, freeze, optimizer, scheduler and transition path, on the tiny config."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from support import TINY, run
from vaeflow import checkpoint as ckpt
from vaeflow import config as cfg
from vaeflow.data import prepare_dataset
from vaeflow.preflight import check_code_level
from vaeflow.trainer import run_stage


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    prepare_dataset(yaml.safe_load(TINY.read_text())["data"], root / "data")
    return root


def one_stage(results, data_dir, **step) -> tuple[dict, dict]:
    """Run a single-stage pipeline whose only step is `step`; returns (config, best.pt)."""
    raw = yaml.safe_load(TINY.read_text())
    raw["training"]["pipeline"]["steps"] = [{"name": "s", "n_epochs": 2, **step}]
    config = cfg.validate(raw)
    check_code_level(config)
    (results / "data").symlink_to(data_dir / "data")
    run_stage(config, "s", results)
    return config, ckpt.load_vaeflow(results / "s" / "best.pt")


def initial_model(config):
    from vaeflow.models import build_model
    from vaeflow.trainer.rng import seed_everything

    seed_everything(config["seed"])  # the trainer seeds with seed + stage index (0) before building
    return build_model(config["model"]).state_dict()


def changed(before: dict, after: dict, prefix: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


def test_freeze_encoder_trains_only_the_decoder(tmp_path, data_dir):
    config, best = one_stage(tmp_path, data_dir, freeze=["encoder"])
    init = initial_model(config)
    assert not changed(init, best["model"], "encoder.") and not changed(init, best["model"], "quant_conv.")
    assert changed(init, best["model"], "decoder.")


def test_gan_only_mode_trains_encoder_and_decoder_through_the_discriminator(tmp_path, data_dir):
    config, best = one_stage(tmp_path, data_dir, train_vae=False, gan_training=True, lambda_adv=1.0, kl_beta=1e-3)
    init = initial_model(config)
    assert changed(init, best["model"], "encoder.") and changed(init, best["model"], "decoder.")
    log = [json.loads(l) for l in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    train = [r["metrics"] for r in log if r["split"] == "train"]
    assert all("g_loss" in m and "d_loss" in m and "recon_loss" not in m for m in train)
    assert best["discriminator"] is not None


def test_frozen_discriminator_is_not_updated(tmp_path, data_dir):
    _, best = one_stage(tmp_path, data_dir, gan_training=True, freeze=["discriminator"])
    assert best["optimizers"].keys() == {"vae"}
    train = [json.loads(l)["metrics"] for l in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["split"] == "train"]
    assert all("g_loss" in m and "d_loss" not in m for m in train)  # G still trains against the frozen D


@pytest.mark.parametrize("opt", [
    {"type": "AdamW", "lr": 1e-3, "weight_decay": 0.01},
    {"type": "Adam", "lr": 1e-3, "betas": [0.8, 0.99]},
    {"type": "SGD", "lr": 1e-2, "momentum": 0.9, "nesterov": True},
    {"type": "RMSprop", "lr": 1e-3, "alpha": 0.9},
])
def test_each_optimizer_trains(tmp_path, data_dir, opt):
    _, best = one_stage(tmp_path, data_dir, optimization={"optimizers": {"vae": opt}})
    state = best["optimizers"]["vae"]
    assert state["param_groups"][0]["lr"] == pytest.approx(opt["lr"])
    assert len(state["state"]) > 0  # the optimizer took steps


@pytest.mark.parametrize("sched, lr_after_2_epochs", [
    ({"type": "CosineAnnealingLR", "eta_min_factor": 0.1}, 1e-4),  # T_max = n_epochs: at eta_min after 2
    ({"type": "StepLR", "step_size": 1, "gamma": 0.5}, 2.5e-4),
    ({"type": "ExponentialLR", "gamma": 0.1}, 1e-5),
    ({"type": "ReduceLROnPlateau", "patience": 0, "factor": 0.5, "mode": "max"}, 5e-4),
])
def test_each_scheduler_steps_per_epoch(tmp_path, data_dir, sched, lr_after_2_epochs):
    _, best = one_stage(tmp_path, data_dir, optimization={"optimizers": {"vae": {"type": "AdamW", "lr": 1e-3}},
                                                            "schedulers": {"vae": sched}})
    last = ckpt.load_vaeflow(tmp_path / "s" / "last.pt")
    assert last["optimizers"]["vae"]["param_groups"][0]["lr"] == pytest.approx(lr_after_2_epochs, rel=1e-6)


def test_loss_threshold_transition_stops_early(tmp_path, data_dir, capsys):
    one_stage(tmp_path, data_dir, n_epochs=1, transition_on={
        "mode": "loss_threshold", "metric": "val_loss", "threshold": 10.0, "max_epochs": 5})
    last = ckpt.load_vaeflow(tmp_path / "s" / "last.pt")
    assert last["epoch"] == 1
    assert "Transition: smoothed val_loss" in capsys.readouterr().out


def test_loss_threshold_never_met_stops_at_max_epochs_with_a_warning(tmp_path, data_dir, capsys):
    one_stage(tmp_path, data_dir, n_epochs=1, transition_on={
        "mode": "loss_threshold", "metric": "recon_loss", "threshold": 1e-9, "max_epochs": 3})
    assert ckpt.load_vaeflow(tmp_path / "s" / "last.pt")["epoch"] == 3
    assert "WARNING: recon_loss never fell below 1e-09; stopping at max_epochs=3" in capsys.readouterr().out


def test_grad_accumulation_counts_optimizer_steps(tmp_path, data_dir):
    one_stage(tmp_path, data_dir, grad_accum_steps=3, grad_clip=0.5)
    last = ckpt.load_vaeflow(tmp_path / "s" / "last.pt")
    assert last["global_step"] == 2 * 2  # 6 batches per epoch / 3 = 2 steps, 2 epochs


def test_lpips_stage_with_random_backbone_for_tests(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("VAEFLOW_LPIPS_RANDOM_BACKBONE", "1")
    one_stage(tmp_path, data_dir, use_lpips=True, lambda_lpips=0.5)
    out = capsys.readouterr().out
    assert "LPIPS uses a RANDOM backbone" in out and "| LPIPS: " in out


def test_beta_tcvae_and_free_bits_and_focal(tmp_path, data_dir):
    one_stage(tmp_path, data_dir, recon_type="bce_focal", beta_start=0.0, beta_end=1e-3, beta_steps=5,
              tc_weight=1e-3, kl_free_bits=0.1)
    train = [json.loads(l)["metrics"] for l in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["split"] == "train"]
    assert all("tc_loss" in m for m in train)
    assert train[0]["beta"] < train[-1]["beta"] == pytest.approx(1e-3)


def test_amp_on_cpu_is_bf16_only_where_the_cpu_has_it(tmp_path, data_dir, capsys):
    from vaeflow.trainer.precision import cpu_features

    one_stage(tmp_path, data_dir, use_amp=True)
    out = capsys.readouterr().out
    if cpu_features().native_bf16:
        assert "Precision: bf16 autocast on cpu (use_amp: true" in out
    else:
        assert "Precision: fp32 on cpu (use_amp: true: this CPU has neither avx512_bf16 nor amx_bf16" in out


def test_validate_prints_the_pipeline_summary():
    res = run(["vaeflow", "validate", str(TINY)], TINY.parent)
    assert "Pipeline validation passed!" in res.stdout
    assert "Total steps: 2" in res.stdout and "Step 2: vae_gan (2 epochs)" in res.stdout
    assert "Training: VAE, GAN" in res.stdout


def test_training_refuses_data_prepared_for_another_config(tmp_path, data_dir):
    from vaeflow.data import DataError

    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["image_size"] = 12
    config = cfg.validate(raw)
    (tmp_path / "data").symlink_to(data_dir / "data")
    with pytest.raises(DataError, match=r"manifest.json was prepared from another data: section \(image_size: 8 \(config wants 12\)\)"):
        run_stage(config, "vae_warmup", tmp_path)


def test_too_deep_discriminator_is_a_config_error_before_training(tmp_path, data_dir):
    raw = yaml.safe_load(TINY.read_text())
    raw["discriminator"]["n_layers"] = 4  # 8x8 images: the PatchGAN runs out of pixels
    raw["training"]["pipeline"]["steps"] = [{"name": "s", "n_epochs": 1, "gan_training": True}]
    config = cfg.validate(raw)
    (tmp_path / "data").symlink_to(data_dir / "data")
    with pytest.raises(cfg.ConfigError, match=r"discriminator.n_layers: 4 layers are too deep for images of shape \(1, 8, 8\)"):
        run_stage(config, "s", tmp_path)
    assert not (tmp_path / "s" / "running" / "last.pt").exists()
