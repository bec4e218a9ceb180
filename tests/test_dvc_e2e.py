"""DVC end to end: repro, no-op repro, per-stage rerun, push/pull into a fresh clone,
and Snakemake's DAG equal to DVC's."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import yaml

from support import REPO, run

pytestmark = pytest.mark.slow


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def git_dvc_repo(project):
    run("git init -q && git config user.email t@t && git config user.name t && dvc init -q", project)
    run(["vaeflow", "dvc-yaml", "--config", "config/config.yaml"], project)
    return project


def push_and_clone(project, tmp_path):
    """dvc push to a local-directory remote, commit, and git clone into a fresh directory."""
    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], project)
    run(["dvc", "push"], project)
    run("git add -A && git commit -qm experiment", project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    return clone


def snakemake_dag(project) -> tuple[set[str], set[tuple[str, str]]]:
    """Jobs and edges from a forced dry run: job i -> j when j consumes a file i produces."""
    plan = run(["snakemake", "-n", "--forceall", "--cores", "1"], project).stdout
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", plan):
        head = re.match(r"(?:local)?rule (\w+):", block)
        if not head or head.group(1) == "all":
            continue
        field = lambda key: (re.search(rf"^\s+{key}: (.*)$", block, re.M) or [None, ""])[1]
        wild = field("wildcards")
        name = head.group(1) + (f"_{wild.split('=', 1)[1]}" if wild else "")
        split = lambda v: {f.strip() for f in v.split(",") if f.strip()}
        jobs.append((name, split(field("input")), split(field("output"))))
    producer = {out: name for name, _, outs in jobs for out in outs}
    edges = {(producer[i], name) for name, ins, _ in jobs for i in ins if i in producer}
    return {name for name, _, _ in jobs}, edges


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
    clone = push_and_clone(project, tmp_path)
    run(["dvc", "pull"], clone)
    assert (clone / "results" / "vae_gan" / "best.pt").exists()
    assert "up to date" in run(["dvc", "status"], clone).stdout.lower()
    assert ran_stages(run(["dvc", "repro"], clone).stdout) == set()
    # Worst case for Snakemake: every file older than the files it was made from.
    for i, p in enumerate(["results/vae_gan/best.pt", "results/vae_gan/last.pt", "results/vae_warmup/best.pt"]):
        os.utime(clone / p, (1_000_000 + i, 1_000_000 + i))
    for p in (clone / "results" / "data").iterdir():
        os.utime(p, (2_000_000, 2_000_000))
    plan = run(["snakemake", "-n", "--cores", "1", "results/vae_gan/best.pt"], clone)
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout
    plan = run(["snakemake", "-n", "--cores", "1"], clone)
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout

    # A file that no longer matches dvc.lock is not trusted: Snakemake reruns from it.
    shutil.copy(clone / "results" / "data" / "val.npy", clone / "results" / "data" / "train.npy")
    plan = run(["snakemake", "-n", "--cores", "1", "results/vae_gan/best.pt"], clone).stdout
    assert "rule prepare" not in plan and "stage=vae_warmup" in plan


def test_dvc_added_raw_images_feed_prepare_and_travel_through_a_remote(project, tmp_path):
    """Raw data tracked with `dvc add data/raw/<name>` is a dependency of prepare."""
    from PIL import Image
    import numpy as np

    raw = project / "data" / "raw" / "shapes"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(raw / f"{i:02d}.png")
    cfg_path = project / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"] = {"dataset": "image_dir", "root": "data/raw/shapes", "image_size": 8, "channels": 1}
    cfg_path.write_text(yaml.safe_dump(cfg))
    git_dvc_repo(project)
    run(["dvc", "add", "data/raw/shapes"], project)
    assert "data/raw/shapes" in (project / "dvc.yaml").read_text()  # prepare depends on it
    assert ran_stages(run(["dvc", "repro", "prepare"], project).stdout) == {"prepare"}
    manifest = (project / "results" / "data" / "manifest.json").read_text()
    assert '"image_dir"' in manifest

    # A changed raw dataset reruns prepare, in both runners.
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(raw / "new.png")
    assert "prepare" in run(["dvc", "status", "prepare"], project).stdout
    plan = run(["snakemake", "-n", "--cores", "1", "results/data/manifest.json"], project).stdout
    assert "rule prepare" in plan
    run(["dvc", "add", "data/raw/shapes"], project)
    run(["dvc", "repro", "prepare"], project)

    clone = push_and_clone(project, tmp_path)
    run(["dvc", "pull", "data/raw/shapes.dvc", "prepare"], clone)
    assert len(list((clone / "data" / "raw" / "shapes").glob("*.png"))) == 41
    assert (clone / "results" / "data" / "train.npy").exists()
    assert "prepare" not in run(["dvc", "status", "prepare"], clone).stdout
