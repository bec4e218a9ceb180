"""Shared fixtures (helpers live in support.py: conftest modules of sub-folders share its name)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support import make_project

# No test may reach a SLURM cluster that merely exists on this machine (or a real one, on a
# login node), and Snakemake's SLURM plugin runs `scontrol show config` whenever snakemake
# starts: ~10 s when a configured controller does not answer. SLURM_CONF=/dev/null fails at
# once. tests/test_slurm.py points SLURM_CONF at its own cluster for what it runs.
os.environ["SLURM_CONF"] = os.devnull


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(tmp_path / "project")
