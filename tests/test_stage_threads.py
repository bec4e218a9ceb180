"""A stage's CPU threads (`cpu_threads` of a step, else training.cpu_threads): the train
command applies them and Snakemake's train job reserves them."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from support import REPO, TINY, copy_prepared, make_project, run
from vaeflow import config as cfg
from vaeflow.cli import main


def _with_gan_threads(n):
    raw = yaml.safe_load(TINY.read_text())
    raw["training"]["pipeline"]["steps"][1]["cpu_threads"] = n
    return raw


def test_a_step_overrides_the_training_default():
    config = cfg.validate(_with_gan_threads(2))
    assert cfg.stage_cpu_threads(config, "vae_warmup") == 1  # training.cpu_threads of the tiny config
    assert cfg.stage_cpu_threads(config, "vae_gan") == 2
    with pytest.raises(cfg.ConfigError, match="cpu_threads"):
        cfg.validate(_with_gan_threads(0))


def test_the_train_command_applies_the_stage_threads(tmp_path, tiny_data, capsys):
    project = make_project(tmp_path / "p")
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(_with_gan_threads(2)))
    copy_prepared(tiny_data, project)
    results = str(project / "results")
    config = str(project / "config" / "config.yaml")
    for stage, threads in (("vae_warmup", 1), ("vae_gan", 2)):
        torch.set_num_threads(3)
        assert main(["train", "--config", config, "--results", results, "--stage", stage]) == 0
        assert torch.get_num_threads() == threads
        assert f"Intra-op CPU threads: {threads} per process (stage {stage})" in capsys.readouterr().out


@pytest.mark.slow
def test_snakemake_reserves_each_train_jobs_threads():
    """The default config: a 2-thread warm-up, then a 1-thread GAN stage."""
    plan = run(["snakemake", "-n", "--cores", "8", "--forceall"], REPO).stdout
    threads = {}
    for block in plan.split("\n\n"):
        if re.search(r"^rule train:", block, re.M):
            stage = re.search(r"wildcards: stage=(\w+)", block).group(1)
            found = re.search(r"threads: (\d+)", block)
            threads[stage] = int(found.group(1)) if found else 1  # Snakemake prints threads above 1
    config = cfg.load(REPO / "config" / "config.yaml")
    assert threads == {s: cfg.stage_cpu_threads(config, s) for s in cfg.stage_names(config)} == {"vae_warmup": 2, "vae_gan": 1}
