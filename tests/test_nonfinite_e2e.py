"""The guard end to end: Snakemake with an injected NaN, a kill after a rollback, the stop message."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from support import run
from test_resume import assert_same_tensors

pytestmark = pytest.mark.slow

TRAIN = ["python", "scripts/train.py", "--config", "config/config.yaml", "--stage"]


def finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def events(path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == "event"]


def test_snakemake_with_an_injected_nan_skips_rolls_back_and_finishes(project):
    # Both stages trained through the fault, then evaluated (sampling and plots would add
    # nothing about the guard).
    targets = ["results/vae_warmup/eval/metrics.json", "results/vae_gan/eval/metrics.json"]
    run(["snakemake", "--cores", "2", *targets], project, timeout=1500, VAEFLOW_FAULT="nan@step:5")
    results = project / "results"
    for stage in ("vae_warmup", "vae_gan"):
        log = (results / "logs" / f"train_{stage}.log").read_text()
        assert "WARNING: VAEFLOW_FAULT is set (test hook): nan at step 5" in log
        assert log.count(f"Non-finite loss at stage {stage}, optimizer step 5") == 3
        assert f"Rolled back to results/{stage}/running/last.pt (step 4" in log and "learning rates x0.5" in log
        assert "3 non-finite steps skipped, 1 rollback(s)" in log
        assert [e["event"] for e in events(results / stage / "metrics.jsonl")] == ["nonfinite_skip"] * 3 + ["nonfinite_rollback"]
        for name in ("best.pt", "last.pt"):
            st = torch.load(results / stage / name, weights_only=True)
            assert all(finite(st[k]) for k in ("model", "ema") if st[k] is not None), f"{stage}/{name}"
            assert st["discriminator"] is None or finite(st["discriminator"])
        assert (results / stage / "eval" / "metrics.json").exists()  # the rest of the pipeline ran on it


def single_gan_stage(project) -> None:
    """One GAN stage (with R1 and LeCAM state), 2 epochs x 12 batches, a save every 3 steps."""
    path = project / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["training"]["save_every"] = 3
    cfg["training"]["pipeline"]["defaults"]["max_steps"] = 12
    cfg["training"]["pipeline"]["steps"] = [{"name": "vae_gan", "n_epochs": 2, "gan_training": True,
                                             "lambda_adv": 0.1, "r1_gamma": 1.0, "lambda_lecam": 0.1}]
    path.write_text(yaml.safe_dump(cfg))
    run(["python", "scripts/prepare.py", "--config", "config/config.yaml"], project)


def test_kill_after_a_rollback_then_resume_is_bit_exact(tmp_path):
    """nan@step:5 rolls back to the step-3 checkpoint. The cut run is SIGKILLed twice after
    that rollback: at step 5 (before the next checkpoint, so the resume meets the NaN and
    rolls back again) and at step 8 (after the step-6 checkpoint, which carries the backoff)."""
    from support import make_project

    ref, cut = make_project(tmp_path / "ref"), make_project(tmp_path / "cut")
    for p in (ref, cut):
        single_gan_stage(p)
    nan = "nan@step:5"
    run(TRAIN + ["vae_gan"], ref, VAEFLOW_FAULT=nan)
    for kill_at in (5, 8):
        res = run(TRAIN + ["vae_gan"], cut, check=False, VAEFLOW_FAULT=f"{nan};kill@step:{kill_at}:rollbacks=1")
        assert res.returncode == -9, res.stdout[-2000:] + res.stderr[-2000:]
        assert "Rolled back to" in res.stdout and not (cut / "results" / "vae_gan" / "best.pt").exists()
    log = run(TRAIN + ["vae_gan"], cut, VAEFLOW_FAULT=nan).stdout
    assert "Resuming from checkpoint: step=1 (vae_gan), epoch=1, batch=6" in log and "Rolled back" not in log

    for name in ("last.pt", "best.pt"):
        a = torch.load(ref / "results" / "vae_gan" / name, weights_only=True)
        b = torch.load(cut / "results" / "vae_gan" / name, weights_only=True)
        assert a["global_step"] == b["global_step"]
        assert [(x["skipped"], x["consecutive_skips"], x["rollbacks"]) for x in (a, b)] == [(3, 0, 1)] * 2
        for key in ("model", "ema", "discriminator", "optimizers", "schedulers", "lecam", "scaler"):
            assert_same_tensors(a[key], b[key], f"{name}:{key}")
    strip = lambda r: {k: v for k, v in r.items() if k not in ("timestamp", "session_id")}  # noqa: E731
    ref_lines = [strip(json.loads(x)) for x in (ref / "results" / "vae_gan" / "metrics.jsonl").read_text().splitlines()]
    cut_lines = [strip(json.loads(x)) for x in (cut / "results" / "vae_gan" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["global_step"], r.get("event")) for r in ref_lines] == \
           [(r["split"], r["global_step"], r.get("event")) for r in cut_lines]


def test_a_persistent_fault_stops_with_one_message_and_exit_code(project):
    single_gan_stage(project)
    cfg_path = project / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["training"]["nonfinite"] = {"max_rollbacks": 1}
    cfg_path.write_text(yaml.safe_dump(cfg))
    res = run(TRAIN + ["vae_gan"], project, check=False, VAEFLOW_FAULT="nan@step:2:always")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("vaeflow: error: training diverged: 3 non-finite steps in a row (loss) at stage vae_gan, optimizer step 2")
    assert "after 1 rollback(s) to results/vae_gan/running/last.pt (step 0)" in line and "max_rollbacks=1 reached" in line
    assert (project / "results" / "vae_gan" / "running" / "last.pt").exists()
    assert not (project / "results" / "vae_gan" / "best.pt").exists()


def test_data_parallel_ranks_take_the_same_decision(project):
    """A NaN loss on rank 1 only: rank 0's loss is finite, so only the all-reduced flag can
    make rank 0 skip for the reason "loss" (its own gradients turn NaN only through the
    gradient average). Both ranks skip; the run neither deadlocks nor diverges."""
    single_gan_stage(project)
    cfg_path = project / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["training"]["distributed"] = {"nproc_per_node": 2, "backend": "gloo"}
    cfg["training"]["pipeline"]["steps"][0]["n_epochs"] = 1
    cfg["training"]["pipeline"]["defaults"]["max_steps"] = 6
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = run(TRAIN + ["vae_gan"], project, VAEFLOW_FAULT="nan@step:3:rank=1:once").stdout
    assert "Data parallel over 2 processes" in out
    assert out.count("Non-finite loss at stage vae_gan, optimizer step 3") == 1  # rank 0 logs, for both
    st = torch.load(project / "results" / "vae_gan" / "last.pt", weights_only=True)
    assert st["global_step"] == 5 and st["skipped"] == 1
    assert finite(st["model"]) and finite(st["discriminator"])
    assert [(e["event"], e["details"]["reason"]) for e in events(project / "results" / "vae_gan" / "metrics.jsonl")] == \
           [("nonfinite_skip", "loss")]
