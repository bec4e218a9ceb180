"""DVC end to end: Snakemake's DAG equal to DVC's, dvc.yaml current, a `dvc add`-ed raw
dataset feeding prepare through a remote. The whole pipeline under `dvc repro`, its metrics,
plots and experiments, and push/pull into a fresh clone are in test_reproducible.py, on the
clone that its fixture has already reproduced."""

from __future__ import annotations

import re

import pytest
import yaml

from support import REPO, push_and_clone, run

pytestmark = pytest.mark.slow


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def git_dvc_repo(project):
    run("git init -q && git config user.email t@t && git config user.name t && dvc init -q", project)
    run(["vaeflow", "dvc-yaml", "--config", "config/config.yaml"], project)
    return project


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
