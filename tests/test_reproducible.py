"""From a fresh clone, as a new user: `dvc repro` works (the repo carries .dvc/), a second
run and `snakemake -n` have nothing to do, Snakemake and DVC in two clones of one commit
write byte-identical checkpoints, DVC's metrics, plots and experiments read the results,
Snakemake's outputs and report are complete, a parameter change reruns only what follows it,
push/pull into another clone retrains nothing in either runner, a code edit reruns stages in
both runners and a docs edit reruns nothing, and `vaeflow provenance` names the commit.

The clones run their own code: PYTHONPATH=<clone>/src stands in for the README's
`pip install --no-deps -e .` inside the clone (the venv already has every dependency).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from support import REPO, TINY, push_and_clone, run

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
    assert {"prepare", "train_vae_warmup", "train_vae_gan", "evaluate_vae_gan", "sample_vae_gan", "summary"} <= ran_stages(out)
    try:
        run(["snakemake", "--cores", "2"], s, timeout=2400, **senv)
    except AssertionError as exc:  # the job logs say why
        logs = "".join(f"\n--- {p.name}:\n{p.read_text()[-2000:]}" for p in sorted((s / "results/logs").glob("*.log")))
        raise AssertionError(f"{exc}{logs}") from None
    commit = run(["git", "rev-parse", "HEAD"], origin).stdout.strip()
    return {"dvc": (d, denv), "smk": (s, senv), "commit": commit}


def planned_jobs(project, env: dict, *targets) -> dict[str, int]:
    """Rule -> job count that `snakemake -n` plans (empty when there is nothing to do)."""
    res = run(["snakemake", "-n", "--cores", "2", *targets], project, **env)
    table = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal", res.stdout, re.S)
    if not table:
        assert "Nothing to be done" in res.stdout + res.stderr, res.stdout
        return {}
    return {name: int(n) for name, n in (line.split() for line in table.group(1).splitlines())}


def test_snakemake_outputs_report_and_reruns_only_what_changed(clones, tmp_path):
    """On a copy of the Snakemake clone, after its `snakemake --cores 2` (the fixture)."""
    project = tmp_path / "smk"
    shutil.copytree(clones["smk"][0], project, symlinks=True)
    env = {"PYTHONPATH": str(project / "src")}
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
    run(["snakemake", "--report", "report.html"], project, **env)
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
    assert planned_jobs(project, env) == {}

    # Changing a vae_gan parameter reruns vae_gan and what follows it, not the warmup.
    cfg_path = project / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["training"]["pipeline"]["steps"][1]["lambda_adv"] = 0.2
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert planned_jobs(project, env) == {"train": 1, "evaluate": 1, "sample": 1, "curves": 1, "summary": 1, "all": 1}
    plan = run(["snakemake", "-n", "--cores", "2"], project, **env).stdout
    assert "wildcards: stage=vae_gan" in plan and "wildcards: stage=vae_warmup" not in plan

    # A third stage in the config is a third target with no rule edits.
    cfg["training"]["pipeline"]["steps"].append({"name": "vae_finetune", "n_epochs": 1, "max_steps": 2})
    cfg_path.write_text(yaml.safe_dump(cfg))
    plan = run(["snakemake", "-n", "--cores", "2", "results/vae_finetune/best.pt"], project, **env).stdout
    assert "wildcards: stage=vae_finetune" in plan and "input: results/data/manifest.json" in plan
    assert "results/vae_gan/best.pt" in plan  # starts from the previous stage's best.pt


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


def test_metrics_plots_experiments_then_push_pull_retrains_nothing(clones, tmp_path):
    """On a copy of the reproduced DVC clone (the other tests keep the original)."""
    project = tmp_path / "experiment"
    shutil.copytree(clones["dvc"][0], project, symlinks=True)
    env = {"PYTHONPATH": str(project / "src")}
    run("git config user.email t@t && git config user.name t", project)
    assert ran_stages(run(["dvc", "repro"], project, **env).stdout) == set()  # the copy is current too

    # Metrics, plots and experiments are readable by DVC's own commands.
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project, **env).stdout)
    flat = json.dumps(shown)
    assert "results/vae_gan/eval/metrics.json" in flat and '"iw_nll_nats"' in flat and '"psnr"' in flat
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots_html")], project, **env)
    page = (tmp_path / "plots_html" / "index.html").read_text()
    assert "vae_gan_train" in page and "loss_curves.png" in page and "vae_traversal_best.png" in page
    run("git add -A && git commit -qm baseline", project)
    exp = run(["dvc", "exp", "show", "--no-pager", "--csv"], project, **env).stdout
    assert "neg_elbo_nats" in exp and "evaluation" in exp

    cfg_path = project / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["training"]["pipeline"]["steps"][1]["lambda_adv"] = 0.2
    cfg_path.write_text(yaml.safe_dump(cfg))
    run(["vaeflow", "dvc-yaml", "--config", "config/config.yaml"], project, **env)
    assert ran_stages(run(["dvc", "repro"], project, **env).stdout) == {
        "train_vae_gan", "evaluate_vae_gan", "sample_vae_gan", "curves_vae_gan", "summary"}

    # Push to a local-directory remote, clone, pull: nothing retrains in either runner.
    clone = push_and_clone(project, tmp_path, **env)
    cenv = {"PYTHONPATH": str(clone / "src")}
    run(["dvc", "pull"], clone, **cenv)
    assert (clone / "results" / "vae_gan" / "best.pt").exists()
    assert "up to date" in run(["dvc", "status"], clone, **cenv).stdout.lower()
    assert ran_stages(run(["dvc", "repro"], clone, **cenv).stdout) == set()
    # Worst case for Snakemake: every file older than the files it was made from.
    for i, p in enumerate(["results/vae_gan/best.pt", "results/vae_gan/last.pt", "results/vae_warmup/best.pt"]):
        os.utime(clone / p, (1_000_000 + i, 1_000_000 + i))
    for p in (clone / "results" / "data").iterdir():
        os.utime(p, (2_000_000, 2_000_000))
    plan = run(["snakemake", "-n", "--cores", "1", "results/vae_gan/best.pt"], clone, **cenv)
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout
    plan = run(["snakemake", "-n", "--cores", "1"], clone, **cenv)
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout

    # A file that no longer matches dvc.lock is not trusted: Snakemake reruns from it.
    shutil.copy(clone / "results" / "data" / "val.npy", clone / "results" / "data" / "train.npy")
    plan = run(["snakemake", "-n", "--cores", "1", "results/vae_gan/best.pt"], clone, **cenv).stdout
    assert "rule prepare" not in plan and "stage=vae_warmup" in plan


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


def test_sweep_beside_the_default_run_touches_none_of_its_files(clones, tmp_path):
    """On a copy of the Snakemake clone, whose default run is done: a 3-row sweep of named runs
    in one `snakemake` call (one-stage rows, the comparison as target), then `vaeflow compare`."""
    project = tmp_path / "sweep"
    shutil.copytree(clones["smk"][0], project, symlinks=True)
    env = {"PYTHONPATH": str(project / "src")}
    results = project / "results"
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in results.rglob("*") if p.is_file()}
    cfg = yaml.safe_load((project / "config" / "config.yaml").read_text())
    cfg["training"]["pipeline"]["steps"] = cfg["training"]["pipeline"]["steps"][:1]  # one stage: a cheap sweep
    (project / "config" / "one_stage.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"run": name, "training.pipeline.steps.0.kl_beta": beta}
            for name, beta in (("beta-6", 1e-6), ("beta-2", 1e-2), ("beta0", 1.0))]
    (project / "sweep.yaml").write_text(yaml.safe_dump({"sweep": {"name": "beta", "base": "config/one_stage.yaml", "runs": rows}}))
    target = "results/compare/beta/compare.md"
    run(["snakemake", "--cores", "2", target, "--configfile", "sweep.yaml"], project, **env)

    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in results.rglob("*") if p.is_file()}
    assert {p: after[p] for p in before} == before  # the default run's files: untouched
    new = sorted(str(p.relative_to(results)) for p in set(after) - set(before))
    data = [n for n in new if n.startswith("data-")]
    assert len({n.split("/")[0] for n in data}) == 1  # one prepared copy for the three rows
    elsewhere = [n for n in new if not (n.split("/")[0] in ("beta-6", "beta-2", "beta0", "compare")
                                        or n.startswith("data-") or re.match(r"(logs|benchmarks)/prepare_data-", n))]
    assert not elsewhere, elsewhere  # a named run writes only its own folder (and the shared data)
    for name in ("beta-6", "beta-2", "beta0"):
        assert (results / name / "vae_warmup" / "best.pt").is_file() and (results / name / "summary.csv").is_file()
    assert planned_jobs(project, env) == {}  # the default run: still complete
    res = run(["snakemake", "-n", "--cores", "1", target, "--configfile", "sweep.yaml"], project, **env)
    assert "Nothing to be done" in res.stdout + res.stderr  # the sweep too

    table = (results / "compare" / "beta" / "compare.md").read_text()
    assert "Winner by psnr (higher is better) on each run's final stage: **beta-6**" in table  # least KL pressure
    assert "`training.pipeline.steps.0.kl_beta`" in table and "| beta0 | vae_warmup | 1 |" in table
    shown = run(["vaeflow", "compare", "beta0", "beta-6"], project, **env).stdout  # any runs, any order
    assert "**beta-6**" in shown and (results / "compare" / "val_curves.png").stat().st_size > 0


def test_dvc_short_set_param_fails_loudly_and_a_queued_sweep_shows_in_exp_show(clones, tmp_path):
    """On a copy of the reproduced DVC clone: `-S seed=3` refused; three `-S` variants queued,
    run two at a time, listed by `dvc exp show` beside their test metrics."""
    project = tmp_path / "exps"
    shutil.copytree(clones["dvc"][0], project, symlinks=True)
    env = {"PYTHONPATH": str(project / "src")}
    run("git config user.email t@t && git config user.name t && git add -A && git commit -qm baseline", project)

    res = run(["dvc", "exp", "run", "-S", "seed=3"], project, check=False, **env)
    assert res.returncode != 0 and "seed" in res.stderr  # DVC: not a key of the (empty) params.yaml
    res = run(["dvc", "exp", "run", "-S", "+seed=3"], project, check=False, **env)
    assert res.returncode != 0
    assert "run `dvc exp run -S 'config/config.yaml:seed=3'`" in res.stdout + res.stderr
    run(["git", "checkout", "--", "params.yaml"], project)

    for k in (4, 8, 32):  # evaluation only: each experiment reruns evaluate and summary
        run(["dvc", "exp", "run", "--queue", "-S", f"config/config.yaml:evaluation.iw_samples={k}"], project, **env)
    run(["dvc", "queue", "start", "-j", "2"], project, **env)
    deadline = time.monotonic() + 900
    while re.search(r"\b(Queued|Running)\b", status := run(["dvc", "queue", "status"], project, **env).stdout):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert status.count("Success") == 3, status
    keep = r"Experiment|evaluation\.iw_samples|results/vae_gan/eval/metrics\.json:(psnr|ssim|nll\.iw_nll_bpd)$"
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv", "--drop", ".*", "--keep", keep], project, **env).stdout
    import csv
    import io

    rows = [r for r in csv.DictReader(io.StringIO(shown)) if r["Experiment"]]
    assert len(rows) == 3, shown
    assert sorted(int(r["evaluation.iw_samples"]) for r in rows) == [4, 8, 32]
    psnr, nll = "results/vae_gan/eval/metrics.json:psnr", "results/vae_gan/eval/metrics.json:nll.iw_nll_bpd"
    assert all(float(r[psnr]) > 0 and float(r["results/vae_gan/eval/metrics.json:ssim"]) > 0 for r in rows)
    assert len({r[nll] for r in rows}) == 3  # k changes the IW-NLL estimate: each row its own result
