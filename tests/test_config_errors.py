"""A bad config gets one message naming the key path, a non-zero exit, and no work started."""

from __future__ import annotations

import copy

import pytest
import yaml

from support import TINY, run
from vaeflow import config as cfg
from vaeflow.preflight import check_code_level


def tiny() -> dict:
    return yaml.safe_load(TINY.read_text())


def broken(mutate) -> dict:
    c = copy.deepcopy(tiny())
    mutate(c)
    return c


CASES = {
    "unknown_key": (lambda c: c["training"].update(batchsize=4), "training.batchsize", "unknown key"),
    "unknown_step_key": (
        lambda c: c["training"]["pipeline"]["steps"][1].update(lr=1), "training.pipeline.steps[1].lr", "unknown key"),
    "wrong_type": (lambda c: c["training"].update(batch_size="big"), "training.batch_size", "not of type 'integer'"),
    "duplicate_stage": (
        lambda c: c["training"]["pipeline"]["steps"][1].update(name="vae_warmup"),
        "training.pipeline.steps[1].name", "duplicate stage name 'vae_warmup'"),
    "freeze_conflict": (
        lambda c: c["training"]["pipeline"]["steps"][0].update(freeze=["encoder"], unfreeze=["encoder"]),
        "training.pipeline.steps[0].freeze", "both frozen and unfrozen"),
    "threshold_metric": (
        lambda c: c["training"]["pipeline"]["steps"][0].update(
            transition_on={"mode": "loss_threshold", "metric": "g_loss", "threshold": 0.1, "max_epochs": 3}),
        "training.pipeline.steps[0].transition_on.metric", "'g_loss' is not logged by this stage"),
    "bad_optimizer": (
        lambda c: c["training"]["pipeline"]["defaults"]["optimization"]["optimizers"]["vae"].update(type="Adagrad"),
        "training.pipeline.defaults.optimization.optimizers.vae.type", "is not one of"),
    "fused_sgd": (
        lambda c: c["training"]["pipeline"]["steps"][1].update(
            optimization={"optimizers": {"discriminator": {"type": "SGD", "lr": 0.01, "fused": True}}}),
        "training.pipeline.steps[1].optimization.optimizers.discriminator.fused", "applies to Adam and AdamW, not SGD"),
    "r1_with_batchnorm": (
        lambda c: (c["discriminator"].update(norm="batch"), c["training"]["pipeline"]["steps"][1].update(r1_gamma=1.0)),
        "discriminator.norm", "BatchNorm breaks"),
    "not_square": (lambda c: c["sampling"].update(samples=10), "sampling.samples", "perfect square"),
    "missing_name": (lambda c: c["training"]["pipeline"]["steps"][0].pop("name"), "training.pipeline.steps[0]", "'name' is a required property"),
    "batch_over_processes": (
        lambda c: c["training"].update(batch_size=30, distributed={"nproc_per_node": 2, "nnodes": 2}),
        "training.batch_size", "30 images do not split evenly over 4 processes"),
    "zero_timeout": (lambda c: c["training"].update(distributed={"timeout_s": 0}),
                     "training.distributed.timeout_s", "less than or equal to the minimum"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_names_the_key(case):
    mutate, path, text = CASES[case]
    with pytest.raises(cfg.ConfigError) as err:
        cfg.validate(broken(mutate))
    assert err.value.path == path
    assert text in str(err.value)


def test_unknown_model_option_is_a_config_error():
    c = cfg.validate(broken(lambda c: c["model"].update(bogus_width=3)))
    with pytest.raises(cfg.ConfigError, match=r"in model: .*bogus_width"):
        check_code_level(c)


@pytest.mark.parametrize("key, stage_key", [("beta", "kl_beta"), ("recon_loss", "recon_type")])
def test_cnn_vae_keys_the_trainer_ignores_name_the_stage_key(key, stage_key):
    """cnn_vae's own beta / recon_loss would be silently ignored: the stage's loss keys rule."""
    c = cfg.validate(broken(lambda c: c.update(model={"type": "cnn_vae", "preset": "mnist", key: 1.0})))
    with pytest.raises(cfg.ConfigError) as err:
        check_code_level(c)
    assert err.value.path == f"model.{key}" and f"training.pipeline.defaults.{stage_key}" in str(err.value)


def test_lpips_without_backbone_weights_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("VAEFLOW_LPIPS_RANDOM_BACKBONE", raising=False)
    c = cfg.validate(broken(lambda c: c["training"]["pipeline"]["steps"][1].update(use_lpips=True)))
    with pytest.raises(cfg.ConfigError, match=r"steps\[1\]\.use_lpips: .*alexnet-owt-7be5be79.pth"):
        check_code_level(c)


def test_defaults_merge_into_steps():
    c = cfg.validate(tiny())
    steps = cfg.resolve_steps(c)
    assert [s["max_steps"] for s in steps] == [6, 6]  # from pipeline.defaults
    assert steps[1]["gan_training"] and not steps[0]["gan_training"]
    assert steps[0]["optimization"]["optimizers"]["vae"]["lr"] == 1e-3


@pytest.mark.parametrize("runner", ["vaeflow", "snakemake"])
def test_runners_refuse_bad_config(project, runner):
    bad = broken(CASES["duplicate_stage"][0])
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(bad))
    cmd = ["vaeflow", "validate", "config/config.yaml"] if runner == "vaeflow" else ["snakemake", "-n", "--cores", "1"]
    res = run(cmd, project, check=False)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "training.pipeline.steps[1].name" in out and "duplicate stage name" in out
    assert "Traceback" not in out
    assert not (project / "results").exists()


def test_stage_command_refuses_bad_config(project):
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(broken(CASES["wrong_type"][0])))
    res = run(["python", "scripts/train.py", "--config", "config/config.yaml", "--stage", "vae_warmup"], project, check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "vaeflow: error: config error in config/config.yaml: training.batch_size: 'big' is not of type 'integer'"
    ]
    assert not (project / "results").exists()

