"""From a fresh clone, as a new user: `dvc repro` works (the repo carries .dvc/), a second
run and `snakemake -n` have nothing to do, Snakemake and DVC in two clones of one commit
write byte-identical checkpoints, a code edit reruns stages in both runners and a docs
edit reruns nothing, and `vaeflow provenance` names the commit.

The clones run their own code: PYTHONPATH=<clone>/src stands in for the README's
`pip install --no-deps -e .` inside the clone (the venv already has every dependency).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from support import REPO, TINY, run

pytestmark = pytest.mark.slow


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def commit_of_working_tree(dest: Path) -> Path:
    """A git repo holding the working tree's files (tracked + untracked, not ignored), with
    the tiny config as config/config.yaml and its dvc.yaml, committed."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src, dst = REPO / rel, dest / rel
        if not (src.exists() or src.is_symlink()):
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(src.readlink())
        else:
            shutil.copy2(src, dst)
    shutil.copy(TINY, dest / "config" / "config.yaml")
    env = {"PYTHONPATH": str(dest / "src")}
    run(["vaeflow", "dvc-yaml", "--config", "config/config.yaml"], dest, **env)
    run("git init -q && git config user.email t@t && git config user.name t && git add -A && git commit -qm tiny",
        dest)
    return dest


def clone(origin: Path, dest: Path) -> tuple[Path, dict]:
    run(["git", "clone", "-q", str(origin), str(dest)], dest.parent)
    return dest, {"PYTHONPATH": str(dest / "src")}


@pytest.fixture(scope="module")
def clones(tmp_path_factory):
    """Two clones of one commit: the DVC one after `dvc repro`, the Snakemake one after a run."""
    tmp = tmp_path_factory.mktemp("repro")
    origin = commit_of_working_tree(tmp / "origin")
    d, denv = clone(origin, tmp / "dvc_clone")
    s, senv = clone(origin, tmp / "smk_clone")
    out = run(["dvc", "repro"], d, timeout=2400, **denv).stdout
    assert {"prepare", "train_vae_warmup", "train_vae_gan", "evaluate_vae_gan", "summary"} <= ran_stages(out)
    try:
        run(["snakemake", "--cores", "2"], s, timeout=2400, **senv)
    except AssertionError as exc:  # the job logs say why
        logs = "".join(f"\n--- {p.name}:\n{p.read_text()[-2000:]}" for p in sorted((s / "results/logs").glob("*.log")))
        raise AssertionError(f"{exc}{logs}") from None
    commit = run(["git", "rev-parse", "HEAD"], origin).stdout.strip()
    return {"dvc": (d, denv), "smk": (s, senv), "commit": commit}


def nothing_to_do(path: Path, env: dict) -> float:
    """Assert both runners have nothing to do; return the wall time of the second `dvc repro`."""
    t0 = time.perf_counter()
    out = run(["dvc", "repro"], path, **env).stdout
    elapsed = time.perf_counter() - t0
    assert ran_stages(out) == set(), out
    assert "up to date" in run(["dvc", "status"], path, **env).stdout.lower()
    plan = run(["snakemake", "-n", "--cores", "1"], path, **env)
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout
    return elapsed


def test_fresh_clone_dvc_repro_then_nothing_to_do(clones):
    d, env = clones["dvc"]
    assert (d / ".dvc" / "config").is_file() and (d / ".dvcignore").is_file()
    elapsed = nothing_to_do(d, env)
    print(f"second dvc repro: {elapsed:.2f} s")
    # The clone is not dirty: dvc.lock (a runner's record) does not count.
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], d).stdout.strip() == ""


def test_snakemake_and_dvc_clones_give_identical_checkpoints(clones):
    (d, _), (s, senv) = clones["dvc"], clones["smk"]
    plan = run(["snakemake", "-n", "--cores", "1"], s, **senv)
    assert "Nothing to be done" in plan.stdout + plan.stderr
    for stage in ("vae_warmup", "vae_gan"):
        a, b = d / f"results/{stage}/best.pt", s / f"results/{stage}/best.pt"
        assert a.read_bytes() == b.read_bytes(), f"{stage}/best.pt differs between the DVC and the Snakemake clone"


def test_provenance_names_the_commit(clones):
    d, env = clones["dvc"]
    for target in ("results/vae_gan/best.pt", "results/vae_gan/eval/metrics.json"):
        out = run(["vaeflow", "provenance", target], d, **env).stdout
        assert f"git commit:       {clones['commit']} (clean)" in out, out
        assert re.search(r"code fingerprint: [0-9a-f]{16}", out) and "torch 2." in out and "snakemake 9." in out
        assert "dvc 3." in out
    from vaeflow.provenance import code_fingerprint, read

    assert read(d / "results/vae_gan/best.pt")["code_fingerprint"] == code_fingerprint(d / "src" / "vaeflow")
    bad = run(["vaeflow", "provenance", "results/vae_gan/metrics.jsonl"], d, check=False, **env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_docs_edit_reruns_nothing_code_edit_reruns_in_both_runners(clones):
    """Each runner judges its own clone: Snakemake by the params it recorded, DVC by dvc.lock."""
    (d, denv), (s, senv) = clones["dvc"], clones["smk"]
    for path in (d, s):
        with open(path / "README.md", "a") as f:
            f.write("\nA docs-only edit.\n")
        (path / "docs" / "data.md").write_text((path / "docs" / "data.md").read_text() + "\nMore docs.\n")
    assert "up to date" in run(["dvc", "status"], d, **denv).stdout.lower()
    plan = run(["snakemake", "-n", "--cores", "1"], s, **senv)
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout

    for path in (d, s):
        loss = path / "src" / "vaeflow" / "losses" / "recon.py"
        loss.write_text(loss.read_text() + "\n# an edit to a loss\n")
    status = run(["dvc", "status"], d, **denv).stdout
    assert "train_vae_warmup:" in status and "train_vae_gan:" in status and "src/vaeflow" in status, status
    dry = run(["dvc", "repro", "--dry"], d, **denv).stdout
    assert {"train_vae_warmup", "train_vae_gan", "evaluate_vae_gan", "summary"} <= ran_stages(dry)
    plan = run(["snakemake", "-n", "--cores", "1"], s, **senv).stdout
    assert "rule train:" in plan and "stage=vae_gan" in plan and "rule summary:" in plan, plan
    assert "Params have changed" in plan

    for path in (d, s):  # reverted: nothing to do again (content, not mtimes, decides)
        run(["git", "checkout", "--", "src"], path)
    assert "up to date" in run(["dvc", "status"], d, **denv).stdout.lower()
    plan = run(["snakemake", "-n", "--cores", "1"], s, **senv)
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout
