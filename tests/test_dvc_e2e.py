"""DVC end to end: repro, no-op repro, per-stage rerun, push/pull into a fresh clone,
and Snakemake's DAG equal to DVC's."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from conftest import REPO, run

pytestmark = pytest.mark.slow


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def git_dvc_repo(project):
    run("git init -q && git config user.email t@t && git config user.name t && dvc init -q", project)
    run(["vaeflow", "dvc-yaml", "--config", "config/config.yaml"], project)
    return project


def snakemake_dag(project) -> tuple[set[str], set[tuple[str, str]]]:
    dot = run(["snakemake", "--dag", "--cores", "1", "--forceall"], project).stdout
    names = {}
    for node, label in re.findall(r'(\d+)\[label = "([^"]+)"', dot):
        rule, _, wild = label.partition("\\n")
        names[node] = rule if not wild else f"{rule}_{wild.split(': ', 1)[1]}"
    edges = {(names[a], names[b]) for a, b in re.findall(r"(\d+) -> (\d+)", dot)}
    keep = lambda n: n != "all"
    return {n for n in names.values() if keep(n)}, {(a, b) for a, b in edges if keep(a) and keep(b)}


def dvc_dag(project) -> tuple[set[str], set[tuple[str, str]]]:
    dot = run(["dvc", "dag", "--dot"], project).stdout
    edges = set(re.findall(r'"([^"]+)" -> "([^"]+)"', dot))
    nodes = set(re.findall(r'"([^"]+)";', dot)) | {n for e in edges for n in e}
    return nodes, edges


def test_snakemake_and_dvc_have_the_same_dag(project):
    git_dvc_repo(project)
    s_nodes, s_edges = snakemake_dag(project)
    d_nodes, d_edges = dvc_dag(project)
    assert s_nodes == d_nodes == {
        "prepare", "train_vae_warmup", "train_vae_gan", "evaluate_vae_warmup", "evaluate_vae_gan",
        "sample_vae_warmup", "sample_vae_gan", "curves_vae_warmup", "curves_vae_gan", "summary",
    }
    assert s_edges == d_edges
    assert ("train_vae_warmup", "train_vae_gan") in s_edges
    assert {("train_vae_gan", "curves_vae_gan"), ("evaluate_vae_warmup", "summary"), ("evaluate_vae_gan", "summary")} <= s_edges


def test_committed_dvc_yaml_is_current():
    res = run(["vaeflow", "dvc-yaml", "--config", "config/config.yaml", "--check"], REPO, check=False)
    assert res.returncode == 0, res.stderr


def test_repro_push_pull_and_snakemake_trusts_pulled_outputs(project, tmp_path):
    git_dvc_repo(project)
    out = run(["dvc", "repro"], project).stdout
    assert ran_stages(out) >= {"prepare", "train_vae_warmup", "train_vae_gan", "evaluate_vae_gan", "sample_vae_gan"}
    assert (project / "results" / "vae_gan" / "best.pt").exists()

    assert ran_stages(run(["dvc", "repro"], project).stdout) == set()  # second repro: nothing

    # Metrics, plots and experiments are readable by DVC's own commands.
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    flat = json.dumps(shown)
    assert "results/vae_gan/eval/metrics.json" in flat and '"iw_nll_nats"' in flat and '"psnr"' in flat
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots_html")], project)
    page = (tmp_path / "plots_html" / "index.html").read_text()
    assert "vae_gan_train" in page and "loss_curves.png" in page and "vae_traversal_best.png" in page
    run("git add -A && git commit -qm baseline", project)
    exp = run(["dvc", "exp", "show", "--no-pager", "--csv"], project).stdout
    assert "neg_elbo_nats" in exp and "evaluation" in exp

    cfg_path = project / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["training"]["pipeline"]["steps"][1]["lambda_adv"] = 0.2
    cfg_path.write_text(yaml.safe_dump(cfg))
    run(["vaeflow", "dvc-yaml", "--config", "config/config.yaml"], project)
    assert ran_stages(run(["dvc", "repro"], project).stdout) == {
        "train_vae_gan", "evaluate_vae_gan", "sample_vae_gan", "curves_vae_gan", "summary"}

    # Push to a local-directory remote, clone, pull: nothing retrains in either runner.
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "local", str(remote)], project)
    run(["dvc", "push"], project)
    run("git add -A && git commit -qm experiment", project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    assert (clone / "results" / "vae_gan" / "best.pt").exists()
    assert "up to date" in run(["dvc", "status"], clone).stdout.lower()
    assert ran_stages(run(["dvc", "repro"], clone).stdout) == set()
    plan = run(["snakemake", "-n", "--cores", "1", "results/vae_gan/best.pt"], clone)
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout
    plan = run(["snakemake", "-n", "--cores", "1"], clone)
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout

    # A file that no longer matches dvc.lock is not trusted: Snakemake reruns from it.
    shutil.copy(clone / "results" / "data" / "val.npy", clone / "results" / "data" / "train.npy")
    plan = run(["snakemake", "-n", "--cores", "1", "results/vae_gan/best.pt"], clone).stdout
    assert "rule prepare" not in plan and "stage=vae_warmup" in plan
