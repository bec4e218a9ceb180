"""Fast checks of profiles/slurm and profiles/default (no cluster needed)."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "profiles/slurm/config.yaml"
DEFAULT = REPO / "profiles/default/config.yaml"


def test_slurm_profile_keys():
    p = yaml.safe_load(SLURM.read_text())
    assert p["executor"] == "slurm"
    assert p["retries"] >= 1 and p["rerun-incomplete"] is True and p["latency-wait"] >= 5
    for key in ("slurm_partition", "runtime", "mem_mb"):
        assert key in p["default-resources"], key
    train = p["set-resources"]["train"]
    # GPUs per node (--gres): `gpu` (--gpus, a job total) breaks multi-node jobs (--gpus < --nodes)
    assert "gpu" in str(train.get("gres", "")) and "gpu" not in train
    assert isinstance(train["cpus_per_task"], int)
    # no slurmdbd needed: squeue, with MinJobAge >= 3 x this wait (60 s <= SLURM's default 300 s)
    assert p["slurm-status-command"] == "squeue"
    assert 3 * p["slurm-init-seconds-before-status-checks"] <= 300
    # an account would be validated with sacctmgr, which needs accounting
    assert "slurm_account" not in p["default-resources"]


def test_workflow_profile_does_not_override_slurm_profile():
    """Keys of the workflow profile replace the --profile's ones wholesale."""
    slurm = yaml.safe_load(SLURM.read_text())
    default = yaml.safe_load(DEFAULT.read_text())
    for key in ("executor", "jobs", "cores", "retries", "default-resources", "set-resources", "resources"):
        assert key not in default, f"profiles/default must not set {key!r}: it would override profiles/slurm"
    for key in set(default) & set(slurm):
        assert default[key] == slurm[key], key


def test_dry_run_with_both_profiles(tmp_path):
    """The toy workflow resolves the profile's resources for `train` (needs the plugin, not a cluster)."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    import shutil

    shutil.copytree(REPO / "tests/slurm_toy", tmp_path, dirs_exist_ok=True)
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "results/vae/best.pt", "--profile", "profiles/slurm"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "workflow specific profile profiles/default" in out
    train = out[out.index("rule train:") :].split("\n\n")[0]
    for want in ("gres=gpu:1", "cpus_per_task=2", "runtime=720", "slurm_partition=debug"):
        assert want in train, train
