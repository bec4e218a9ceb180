"""The code that runs is the checkout's code (docs/checkout.md): a clone or worktree runs its
own src/, whichever vaeflow the environment has installed; `vaeflow <command>` refuses to
run another tree's code inside a checkout, with the fixes."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from support import REPO, make_project, run, tool_env
from vaeflow import provenance


def copy_of_package(root: Path) -> Path:
    shutil.copytree(provenance.PACKAGE_DIR, root / "src" / "vaeflow", ignore=shutil.ignore_patterns("__pycache__"))
    return root / "src" / "vaeflow"


def test_a_checkout_with_other_code_is_refused_with_the_fixes(tmp_path):
    assert provenance.foreign_code(tmp_path) is None  # not a checkout: nothing to compare
    pkg = copy_of_package(tmp_path)
    assert provenance.foreign_code(tmp_path) is None  # the same files elsewhere: the same code
    with open(pkg / "losses" / "recon.py", "a") as f:
        f.write("\n# an edit in this checkout\n")
    provenance.code_fingerprint.cache_clear()  # a process hashes a tree once; this one edited it since
    problem = provenance.foreign_code(tmp_path)
    assert f"the vaeflow that runs is {provenance.PACKAGE_DIR}, not this checkout's {pkg}" in problem
    assert "`export PYTHONPATH=$PWD/src`" in problem and "`pip install --no-deps -e .`" in problem

    # The Snakefile's note: the environment's vaeflow was that other tree.
    spec = importlib.util.spec_from_file_location("vaeflow", pkg / "__init__.py")
    assert f"not the environment's vaeflow ({pkg})" in provenance.other_install_note(spec)
    assert provenance.other_install_note(importlib.util.find_spec("vaeflow")) is None


def test_stage_commands_refuse_and_the_stage_scripts_run_their_checkout(tmp_path):
    pkg = copy_of_package(tmp_path)
    shutil.copytree(REPO / "scripts", tmp_path / "scripts")
    (pkg / "__init__.py").write_text((pkg / "__init__.py").read_text() + "\nprint('vaeflow from', __file__)\n")
    # `python -m vaeflow.cli` with this interpreter's vaeflow, in the edited checkout: refused, exit 2
    res = subprocess.run([sys.executable, "-m", "vaeflow.cli", "summary"], cwd=tmp_path, capture_output=True,
                         text=True, env=tool_env(), timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("vaeflow: error: the vaeflow that runs is "), res.stderr
    assert "vaeflow from" not in res.stdout
    # the checkout's script runs the checkout's code (and passes it on to the processes it starts)
    res = subprocess.run([sys.executable, "scripts/summary.py", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, env=tool_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"vaeflow from {pkg / '__init__.py'}" in res.stdout


def venv_with_editable_install(tmp_path: Path, checkout: Path) -> Path:
    """A venv whose vaeflow is an editable install (`pip install --no-deps -e`) of `checkout`;
    its other packages are this environment's."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # after the editable .pth
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "-e", str(checkout)], check=True, capture_output=True, timeout=300)
    return venv


@pytest.mark.slow
def test_a_second_clone_runs_its_own_code_with_a_venv_installed_from_the_first(tmp_path):
    origin = make_project(tmp_path / "origin")
    for name in ("pyproject.toml", "README.md"):  # what `pip install -e` reads
        shutil.copy(REPO / name, origin / name)
    run(["vaeflow", "dvc-yaml", "--config", "config/config.yaml"], origin, PYTHONPATH=str(origin / "src"))
    run("git init -q && git config user.email t@t && git config user.name t && dvc init -q && git add -A "
        "&& git commit -qm tiny", origin)
    first, second = tmp_path / "first", tmp_path / "second"
    for clone in (first, second):
        run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    venv = venv_with_editable_install(tmp_path, first)
    env = {k: v for k, v in tool_env().items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"

    def sh(*cmd, **extra):
        return subprocess.run(cmd, cwd=second, env={**env, **extra}, capture_output=True, text=True, timeout=300)

    # The setup: in the second clone, `import vaeflow` is the first clone's.
    assert sh("python", "-c", "import vaeflow; print(vaeflow.__file__)").stdout.startswith(str(first / "src"))
    res = sh("python", "-m", "snakemake", "--cores", "1", "results/data/manifest.json")
    assert res.returncode == 0, res.stderr[-3000:]

    # A loss edit in the second clone: Snakemake sees it (the code fingerprint in every rule's params) ...
    with open(second / "src" / "vaeflow" / "losses" / "recon.py", "a") as f:
        f.write("\n# a loss edit in the second clone\n")
    res = sh("python", "-m", "snakemake", "-n", "results/data/manifest.json")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Params have changed since last execution" in res.stdout and "prepare        1" in res.stdout, res.stdout
    assert f"this checkout's code runs ({second / 'src' / 'vaeflow'}), not the environment's vaeflow " \
           f"({first / 'src' / 'vaeflow'})" in res.stderr

    # ... `vaeflow <command>` refuses, with the fixes, and the fix works.
    res = sh("vaeflow", "validate", "config/config.yaml")
    assert res.returncode == 2 and "pip install --no-deps -e ." in res.stderr and "PYTHONPATH" in res.stderr, res.stderr
    res = sh("vaeflow", "validate", "config/config.yaml", PYTHONPATH=str(second / "src"))
    assert res.returncode == 0 and "Pipeline validation passed!" in res.stdout, res.stderr

    # A DVC experiment run in a temporary copy of the workspace (as `dvc exp run --queue` does)
    # runs the copy's code: the workspace's uncommitted edits, not the first clone's.
    init = second / "src" / "vaeflow" / "__init__.py"
    init.write_text(init.read_text() + "\nprint('vaeflow from', __file__)\n")
    res = sh("python", "-m", "dvc", "exp", "run", "--temp", "prepare")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"vaeflow from {second / '.dvc' / 'tmp' / 'exps'}" in res.stdout, res.stdout[-3000:]
