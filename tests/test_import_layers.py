"""The import layers of pyproject.toml's [tool.importlinter] hold, and breaking one fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from support import REPO

LINT = str(Path(sys.executable).parent / "lint-imports")


def lint(cwd: Path, src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    res = lint(REPO, REPO / "src")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """models importing interop (an upward arrow) is reported, naming the modules."""
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(REPO / "src" / "vaeflow", tmp_path / "src" / "vaeflow",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "src" / "vaeflow" / "models" / "blocks.py", "a") as f:
        f.write("\nfrom vaeflow.interop import diffusers  # noqa: E402,F401\n")
    res = lint(tmp_path, tmp_path / "src")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Models never import interop" in res.stdout and "BROKEN" in res.stdout
    assert "vaeflow.models.blocks -> vaeflow.interop.diffusers" in res.stdout
