"""Snakemake plans of named runs and sweep files (dry runs: no job runs). A sweep that runs,
beside the default run, is in test_reproducible.py."""

from __future__ import annotations

import re

import pytest
import yaml

from support import run

pytestmark = pytest.mark.slow

ROWS = [
    {"run": "adv0.05", "training.pipeline.steps.1.lambda_adv": 0.05},
    {"run": "adv0.3", "training.pipeline.steps.1.lambda_adv": 0.3},
    {"run": "seed1", "seed": 1},
]


def write_sweep(project, rows, name="sweep.yaml"):
    (project / name).write_text(yaml.safe_dump({"sweep": {"runs": rows}}, sort_keys=False))
    return name


def job_counts(plan: str) -> dict[str, int]:
    table = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal", plan, re.S)
    return {name: int(n) for name, n in (line.split() for line in table.group(1).splitlines())}


def test_every_row_is_planned_in_one_dag_with_one_shared_prepare(project):
    sweep = write_sweep(project, ROWS)
    plan = run(["snakemake", "-n", "--cores", "2", "--configfile", sweep], project).stdout
    assert job_counts(plan) == {"prepare_run": 1, "train_run": 6, "evaluate_run": 6, "sample_run": 6,
                                "curves_run": 6, "summary_run": 3, "compare": 1, "all": 1}
    for name in ("adv0.05", "adv0.3", "seed1"):
        # each row's stage commands read the row's resolved config, written before any job
        assert f"python scripts/train.py --config results/{name}/config.yaml --results results --stage vae_gan" in plan
        assert f"wildcards: run={name}, stage=vae_gan" in plan
        assert (project / "results" / name / "config.yaml").is_file()
    assert "results/adv0.05/vae_gan/best.pt" in plan and "results/vae_gan/best.pt" not in plan.replace("/adv", "")
    assert "rule prepare:" not in plan  # the default run's data is not touched
    assert "results/compare/sweep/compare.md" in plan and "results/compare/sweep/val_curves.png" in plan
    # the second stage starts from its own run's first stage
    assert re.search(r"input: results/data-[0-9a-f]{16}/manifest.json.*results/adv0.3/vae_warmup/best.pt", plan)


def test_a_bad_row_stops_the_invocation_before_any_job(project):
    sweep = write_sweep(project, [ROWS[0], {"run": "b", "training.pipeline.steps.1.lambda_adv": -1}])
    res = run(["snakemake", "-n", "--cores", "2", "--configfile", sweep], project, check=False)
    assert res.returncode != 0
    assert "sweep.yaml, row 2 (b): training.pipeline.steps[1].lambda_adv: -1 is less than the minimum of 0" in res.stderr + res.stdout
    assert not (project / "results").exists()  # not even the valid row's config


def test_named_config_plans_under_its_folder_and_the_default_run_stays_apart(project):
    cfg = yaml.safe_load((project / "config" / "config.yaml").read_text())
    (project / "config" / "named.yaml").write_text(yaml.safe_dump({**cfg, "run": "solo"}))
    plan = run(["snakemake", "-n", "--cores", "2", "--configfile", "config/named.yaml"], project).stdout
    assert re.search(r"python scripts/train.py --config \S*config/named.yaml --results results --stage vae_warmup", plan)
    assert "results/solo/summary.csv" in plan and "rule compare:" not in plan
    # the default run's files are not this invocation's: a target of it is refused, not run
    res = run(["snakemake", "-n", "--cores", "2", "results/data/manifest.json", "--configfile", "config/named.yaml"],
              project, check=False)
    assert res.returncode != 0 and "named runs only (solo)" in res.stderr + res.stdout
    # the default run plans as before
    plan = run(["snakemake", "-n", "--cores", "2"], project).stdout
    assert "wildcards: stage=vae_gan" in plan and "results/solo" not in plan
    assert "python scripts/prepare.py --config config/config.yaml --results results" in plan


def test_config_overrides_of_a_sweep_are_refused(project):
    sweep = write_sweep(project, ROWS)
    res = run(["snakemake", "-n", "--cores", "1", "--configfile", sweep, "--config", "seed=3"], project, check=False)
    assert res.returncode != 0 and "--config overrides are not passed to the stage commands" in res.stderr + res.stdout
