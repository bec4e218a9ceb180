"""Shared fixtures (helpers live in support.py: conftest modules of sub-folders share its name)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import make_project, prepare_tiny

# No test may reach a SLURM cluster that merely exists on this machine (or a real one, on a
# login node), and Snakemake's SLURM plugin runs `scontrol show config` whenever snakemake
# starts: ~10 s when a configured controller does not answer. SLURM_CONF=/dev/null fails at
# once. tests/test_slurm.py (and test_slurm_two_nodes.py) point SLURM_CONF at their own cluster.
os.environ["SLURM_CONF"] = os.devnull

# Every `dvc` command forks an analytics daemon (`dvc daemon analytics`, ~0.6 CPU-s each,
# ~40 in a suite run on 2 cores); the tests must not reach the network anyway.
os.environ["DVC_NO_ANALYTICS"] = "1"

# The whole suite at the lowest CPU priority (inherited by every worker and job): the rules'
# `nice -n 19` side jobs (evaluate, sample, curves beside the next training) then share the
# cores evenly with the other workers' processes instead of starving behind them on a busy
# machine (a Snakemake test's niced evaluate jobs waited about 100 s: 119 s for a test that
# takes 14 s alone). Only scheduling changes; SLURM's jobs (started by slurmd) keep theirs.
os.nice(19 - os.nice(0))

# pytest-xdist runs the suite in four workers on 2 cores, beside the jobs the tests start: one
# intra-op thread per worker, and idle OpenMP threads that sleep instead of spinning
# (OMP_WAIT_POLICY=PASSIVE, inherited by every job; support.tool_env sets it too). Spinning
# threads of side-by-side processes made an in-process bf16 test take 653 s instead of 55 s.
# Only scheduling changes, never the numbers. Stage commands set their own count from
# training.cpu_threads.
XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _one_thread() -> None:
    if XDIST:
        import torch

        torch.set_num_threads(1)


_one_thread()  # for session fixtures, which start before the per-test reset below


# The longest test files, longest first (wall seconds per file in a full run, by
# benchmarks/pytest_cpu_per_test.py, 2026-12-07). pytest-xdist hands each file to one worker
# (`--dist loadfile`, pyproject.toml) in collection order; longest first keeps a long file
# from running alone at the end (test_trainer_modes.py, 24 s, ran last and alone for 20 s
# when only the first nine were listed). Only the order changes: a file missing here runs
# after them.
LONGEST_FIRST = [
    "tests/test_slurm.py",  # these two mostly wait on SLURM jobs, beside the rest (202 s, 92 s)
    "tests/test_slurm_two_nodes.py",
    "tests/test_reproducible.py",  # 210 s
    "tests/test_resume.py",  # 195 s
    "tests/test_precision.py",  # 122 s, one test
    "tests/invariants/test_resume_stochastic.py",  # 3 kill-and-resume pairs, one under torchrun
    "tests/test_fuzz_config.py",  # 66 s
    "tests/invariants/test_two_processes.py",  # torchrun twice, 2-process stages twice
    "tests/test_nonfinite_e2e.py",  # 53 s
    "tests/test_distributed.py",  # 43 s
    "tests/test_schema_keys.py",  # 37 s
    "tests/test_sweep_plan.py",  # 35 s (six `snakemake -n` of named runs and sweeps)
    "tests/test_bench_autoencoder_kl.py",  # 30 s
    "tests/evaluation/test_rfid.py",  # 28 s
    "tests/test_trainer_modes.py",  # 24 s
    "tests/test_model_families.py",  # 23 s
    "tests/test_dvc_e2e.py",  # 19 s
    "tests/test_nonfinite.py",  # 19 s
    "tests/evaluation/test_device.py",  # 14 s
    "tests/test_grad_sync.py",  # 14 s
    "tests/models/test_autoencoder_kl.py",  # 12 s
    "tests/test_config_errors.py",  # 11 s
]


def pytest_collection_modifyitems(config, items):
    """The files of LONGEST_FIRST first, then the other slow tests, then the many short ones,
    which fill the workers at the end. Stable: tests keep their order within a file."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}

    def key(item):
        path = Path(item.path).relative_to(config.rootpath).as_posix()
        return rank.get(path, len(rank)), item.get_closest_marker("slow") is None

    items.sort(key=key)


@pytest.fixture(autouse=True)
def _one_thread_per_worker():
    """Back to one thread before each test: `vaeflow train` run in-process sets its own count."""
    _one_thread()
    yield


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The tiny config's prepared digits (results/data of tests/configs/tiny.yaml), made once
    per session; copy it with support.copy_prepared instead of running prepare again."""
    return prepare_tiny(tmp_path_factory.mktemp("tiny_prepared"))
