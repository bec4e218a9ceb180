"""The evaluate rule asks SLURM for a GPU when evaluation runs on CUDA, and for a runtime
that grows with the test split (vaeflow.trainer.slurm.evaluate_job_resources)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml

from support import REPO, TINY, make_project, run
from vaeflow import config as cfg
from vaeflow.trainer.slurm import evaluate_job_resources

DEFAULT = cfg.load(REPO / "config" / "config.yaml")


def with_eval(**changes) -> dict:
    c = copy.deepcopy(DEFAULT)
    c["evaluation"].update(changes)
    return c


def manifest(tmp_path, n_test: int):
    path = tmp_path / f"manifest_{n_test}.json"
    path.write_text(json.dumps({"counts": {"train": 10, "val": 1, "test": n_test}}))
    return path


def test_gpu_only_when_evaluation_runs_on_cuda():
    assert "gres" not in evaluate_job_resources(DEFAULT)  # device auto: no GPU is asked for
    assert evaluate_job_resources(with_eval(device="cuda"))["gres"] == "gpu:1"
    assert evaluate_job_resources(with_eval(device="cuda:1"))["gres"] == "gpu:1"
    assert "gres" not in evaluate_job_resources(with_eval(device="cpu"))
    gpu_training = copy.deepcopy(DEFAULT)
    gpu_training["training"]["device"] = "cuda"  # evaluation.device null follows training.device
    assert evaluate_job_resources(gpu_training)["gres"] == "gpu:1"


def test_runtime_grows_with_the_test_split_and_the_attempt(tmp_path):
    for c in (DEFAULT, with_eval(device="cuda")):
        small, large = (evaluate_job_resources(c, manifest(tmp_path, n))["runtime"] for n in (180, 20000))
        assert small < large, (small, large)
        assert evaluate_job_resources(c, manifest(tmp_path, 20000), attempt=2)["runtime"] >= 2 * large - 1
    # CelebA's official test split with rFID on a CPU: hours, not the old fixed 30 minutes
    assert evaluate_job_resources(DEFAULT, manifest(tmp_path, 19962))["runtime"] > 10 * 60
    assert evaluate_job_resources(with_eval(fid_images=0), manifest(tmp_path, 19962))["runtime"] < 3 * 60


@pytest.mark.slow
def test_the_rule_carries_them_into_the_job(tmp_path):
    """Snakemake's dry run shows the evaluate job's resources: a GPU for evaluation.device cuda,
    and a runtime read from the prepared manifest when it exists."""
    config = yaml.safe_load(TINY.read_text())
    config.setdefault("evaluation", {})["device"] = "cuda"
    config_path = tmp_path / "cuda.yaml"
    config_path.write_text(yaml.safe_dump(config))
    project = make_project(tmp_path / "p", config_path)

    def evaluate_resources(*profile):
        res = run(["snakemake", "-n", "--cores", "1", "results/vae_gan/eval/metrics.json", *profile], project)
        block = res.stdout.split("rule evaluate:", 1)[1]
        return dict(re.findall(r"(\w+)=([^,\s]+)", re.search(r"resources: (.*)", block).group(1)))

    before = evaluate_resources()
    assert before["gres"] == "gpu:1", before
    (project / "results" / "data").mkdir(parents=True)
    (project / "results" / "data" / "manifest.json").write_text(json.dumps({"counts": {"test": 200000}}))
    after = evaluate_resources()
    assert int(after["runtime"]) > int(before["runtime"]), (before, after)

    pytest.importorskip("snakemake_executor_plugin_slurm")
    # through the SLURM profile (what sbatch would get): the rule's GPU and runtime survive it
    slurm = evaluate_resources("--profile", "profiles/slurm")
    assert slurm["gres"] == "gpu:1" and slurm["runtime"] == after["runtime"], slurm
