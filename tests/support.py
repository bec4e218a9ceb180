"""Test helpers: run the real tools, and make a throwaway copy of the workflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "configs" / "tiny.yaml"
WORKFLOW_PARTS = ["workflow", "rules", "scripts", "envs", "config", "profiles", "src"]


def tool_env(**extra) -> dict:
    """Environment whose PATH finds this interpreter's python, snakemake and dvc first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")  # tests run jobs side by side on 2 cores
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: no spinning against the other jobs
    env.update(extra)
    return env


def run(cmd, cwd, check=True, timeout=600, **env_extra) -> subprocess.CompletedProcess:
    res = subprocess.run(
        cmd, cwd=cwd, env=tool_env(**env_extra), capture_output=True, text=True, timeout=timeout,
        shell=isinstance(cmd, str),
    )
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\nSTDOUT:\n{res.stdout[-4000:]}\nSTDERR:\n{res.stderr[-4000:]}")
    return res


def make_project(dest: Path, config: Path = TINY) -> Path:
    """Copy the workflow files (not results) into dest, with `config` as config/config.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        src = REPO / part
        if src.exists():
            # dereference config/schema.yaml; src/vaeflow is a dependency of every DVC stage
            shutil.copytree(src, dest / part, symlinks=False, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(config, dest / "config" / "config.yaml")
    shutil.copy(REPO / ".gitignore", dest / ".gitignore")
    shutil.copy(REPO / ".dvcignore", dest / ".dvcignore")
    shutil.copy(REPO / "params.yaml", dest / "params.yaml")  # kept empty: dvc exp run -S key=v fails loudly
    return dest


def prepare_tiny(dest: Path) -> Path:
    """Prepare the tiny config's data into dest/data (in-process: no interpreter start-up)."""
    import yaml

    from vaeflow.data import prepare_dataset

    prepare_dataset(yaml.safe_load(TINY.read_text())["data"], dest / "data")
    return dest / "data"


def copy_prepared(data: Path, project: Path) -> None:
    """Put prepared data into project/results/data, as `scripts/prepare.py` would have.
    Only for tests whose subject is not prepare itself."""
    shutil.copytree(data, project / "results" / "data")


def push_and_clone(project: Path, tmp_path: Path, **env_extra) -> Path:
    """dvc push to a local-directory remote, commit, and git clone into tmp_path/clone."""
    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], project, **env_extra)
    run(["dvc", "push"], project, **env_extra)
    run("git add -A && git commit -qm experiment", project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    return clone
