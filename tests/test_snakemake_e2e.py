"""Snakemake end to end on the tiny config: targets, no-op rerun, per-stage reruns, lint."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from support import REPO, run

pytestmark = pytest.mark.slow


def planned_jobs(project, *targets) -> dict[str, int]:
    """Rule -> job count that `snakemake -n` plans (empty when there is nothing to do)."""
    res = run(["snakemake", "-n", "--cores", "2", *targets], project)
    table = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal", res.stdout, re.S)
    if not table:
        assert "Nothing to be done" in res.stdout + res.stderr, res.stdout
        return {}
    return {name: int(n) for name, n in (line.split() for line in table.group(1).splitlines())}


def test_pipeline_runs_and_reruns_only_what_changed(project):
    # One thread per training job: the tiny model gains nothing from two, and the other core
    # then evaluates and samples the warm-up while the GAN stage trains.
    run(["snakemake", "--cores", "2", "--set-threads", "train=1"], project)
    results = project / "results"
    for stage in ("vae_warmup", "vae_gan"):
        for name in ("best.pt", "last.pt", "metrics.jsonl", "eval/metrics.json",
                     "samples/vae_recon_grid_best.png", "samples/vae_generated_grid_best.png",
                     "samples/vae_latent_grid_best.png", "samples/vae_traversal_best.png",
                     "samples/vae_interpolation_best.png", "samples/sampling_best.json",
                     "plots/loss_curves.png", "plots/train.csv", "plots/val.csv"):
            assert (results / stage / name).stat().st_size > 0, f"{stage}/{name}"
        assert not (results / stage / "running").exists()  # work dir dropped once published
        records = [json.loads(line) for line in (results / stage / "metrics.jsonl").read_text().splitlines()]
        assert {r["split"] for r in records} == {"train", "val"}
        assert all({"timestamp", "session_id", "epoch", "batch", "global_step", "metrics"} <= set(r) for r in records)
    assert "Step vae_gan (2/2) | Epoch 2/2 | Batch 6/6 | VAE:" in (results / "logs" / "train_vae_gan.log").read_text()
    metrics = json.loads((results / "vae_gan" / "eval" / "metrics.json").read_text())
    assert {"mse", "psnr", "ssim", "lpips", "nll", "active_units", "pca", "latent_dims"} <= set(metrics)
    assert metrics["latent_dims"] == 2 * 4 * 4
    assert metrics["nll"]["iw_nll_nats"] <= metrics["nll"]["neg_elbo_nats"]
    summary = (results / "summary.md").read_text()
    assert "| vae_warmup |" in summary and "| vae_gan |" in summary

    # The report holds the loss curves, every sample grid and the evaluation table.
    run(["snakemake", "--report", "report.html"], project)
    html = (project / "report.html").read_text()
    embedded = set(re.findall(r"data:image/png;charset=utf8;filename=([^;]+);base64,iVBORw0KGgo", html))
    assert embedded == {"loss_curves.png", "vae_recon_grid_best.png", "vae_generated_grid_best.png",
                        "vae_latent_grid_best.png", "vae_traversal_best.png", "vae_interpolation_best.png"}
    assert html.count("data:image/png;charset=utf8;") == 12  # 2 stages x (curves + 5 grids)
    assert "filename=summary.html;base64," in html  # the evaluation table
    for category in ("Loss curves", "Samples", "Evaluation"):
        assert category in html
    for tsv in ("prepare", "train_vae_warmup", "evaluate_vae_gan"):
        assert (results / "benchmarks" / f"{tsv}.tsv").exists()

    # Nothing to do after success.
    assert planned_jobs(project) == {}

    # Changing a vae_gan parameter reruns vae_gan and what follows it, not the warmup.
    cfg_path = project / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["training"]["pipeline"]["steps"][1]["lambda_adv"] = 0.2
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert planned_jobs(project) == {"train": 1, "evaluate": 1, "sample": 1, "curves": 1, "summary": 1, "all": 1}
    plan = run(["snakemake", "-n", "--cores", "2"], project).stdout
    assert "wildcards: stage=vae_gan" in plan and "wildcards: stage=vae_warmup" not in plan

    # A third stage in the config is a third target with no rule edits.
    cfg["training"]["pipeline"]["steps"].append({"name": "vae_finetune", "n_epochs": 1, "max_steps": 2})
    cfg_path.write_text(yaml.safe_dump(cfg))
    plan = run(["snakemake", "-n", "--cores", "2", "results/vae_finetune/best.pt"], project).stdout
    assert "wildcards: stage=vae_finetune" in plan and "input: results/data/manifest.json" in plan
    assert "results/vae_gan/best.pt" in plan  # starts from the previous stage's best.pt


def test_lint_and_format_clean():
    res = run(["snakemake", "--lint", "--cores", "1"], REPO, check=False)
    assert res.returncode == 0 and "Lints for" not in res.stdout + res.stderr, res.stdout + res.stderr
    files = ["workflow/Snakefile", *map(str, sorted((REPO / "rules").glob("*.smk")))]
    res = run(["snakefmt", "--check", *files], REPO, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
