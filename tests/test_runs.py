"""Named runs, sweep files and `vaeflow compare` (fast: no training). The end-to-end runs are
in test_reproducible.py (a sweep beside the default run, DVC's queue) and test_sweep_plan.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from support import TINY
from vaeflow import config as vfconfig
from vaeflow.compare import CompareError, compare_runs, discover_runs
from vaeflow.layout import Layout
from vaeflow.sweep import resolve_sweep, set_dotted, snakemake_runs


def tiny() -> dict:
    return yaml.safe_load(TINY.read_text())


def test_default_run_keeps_todays_paths():
    layout = vfconfig.run_layout(vfconfig.validate(tiny()))
    assert layout.run_dir == Path("results") and layout.data == Path("results/data")
    assert str(layout.stage("vae_gan").best) == "results/vae_gan/best.pt"
    assert [str(p) for p in layout.summary_files()] == ["results/summary.csv", "results/summary.md", "results/summary.html"]
    assert str(layout.log("train", "vae_gan")) == "results/logs/train_vae_gan.log"
    assert str(layout.data_log()) == "results/logs/prepare.log"
    assert layout.outputs("vae_gan", "best") == Layout().outputs("vae_gan", "best")


def test_named_run_owns_its_folder_and_shares_data_by_data_section():
    a = vfconfig.validate({**tiny(), "run": "a"})
    b = vfconfig.validate({**tiny(), "run": "b", "seed": 7})
    c = copy.deepcopy(b)
    c["run"], c["data"]["split_seed"] = "c", 1
    la, lb, lc = (vfconfig.run_layout(x) for x in (a, b, c))
    assert str(la.stage("vae_gan").best) == "results/a/vae_gan/best.pt"
    assert str(la.summary_files()[0]) == "results/a/summary.csv" and str(la.log("train", "s")) == "results/a/logs/train_s.log"
    assert la.data == lb.data != lc.data  # equal data sections: one prepared copy
    assert la.data.name.startswith("data-") and la.data.parent == Path("results")
    assert str(la.prior_checkpoint(["vae_warmup", "vae_gan"], "vae_gan")) == "results/a/vae_warmup/best.pt"
    # the run name is not part of any stage's fingerprint: renaming a run reruns nothing
    assert vfconfig.stage_view(a, "vae_gan") == vfconfig.stage_view({**a, "run": "z"}, "vae_gan")


@pytest.mark.parametrize("name, why", [
    ("data", "reserved"), ("logs", "reserved"), ("benchmarks", "reserved"), ("compare", "reserved"),
    ("default", "reserved"), ("data-1234", "reserved"), ("summary.csv", "reserved"),
    ("vae_gan", "also a stage name"), ("a/b", "does not match"), (".hidden", "does not match"),
])
def test_run_names_that_would_collide_are_refused(name, why):
    with pytest.raises(vfconfig.ConfigError, match=why) as exc:
        vfconfig.validate({**tiny(), "run": name})
    assert str(exc.value).startswith("config error in run:")


def test_set_dotted_indexes_lists_and_names_the_bad_key():
    cfg = tiny()
    set_dotted(cfg, "training.pipeline.steps.1.lambda_adv", 0.05, "s")
    assert cfg["training"]["pipeline"]["steps"][1]["lambda_adv"] == 0.05
    with pytest.raises(vfconfig.ConfigError, match=r"training\.pipeline\.steps\.2: .*list of 2 item"):
        set_dotted(cfg, "training.pipeline.steps.2.lambda_adv", 1, "s")
    with pytest.raises(vfconfig.ConfigError, match="seed is int"):
        set_dotted(cfg, "seed.x", 1, "s")


def sweep_file(tmp_path, rows, **extra) -> Path:
    (tmp_path / "base.yaml").write_text(TINY.read_text())
    path = tmp_path / "my_sweep.yaml"
    path.write_text(yaml.safe_dump({"sweep": {"base": str(tmp_path / "base.yaml"), "runs": rows, **extra}}))
    return path


def test_sweep_rows_resolve_to_named_runs(tmp_path):
    path = sweep_file(tmp_path, [{"run": "adv0.05", "training.pipeline.steps.1.lambda_adv": 0.05},
                                 {"run": "s1", "seed": 1}])
    name, runs = resolve_sweep(yaml.safe_load(path.read_text()), str(path), tmp_path / "results")
    assert name == "my_sweep" and [r.name for r in runs] == ["adv0.05", "s1"]
    steps = vfconfig.resolve_steps(runs[0].config)
    assert steps[1]["lambda_adv"] == 0.05 and runs[1].config["seed"] == 1
    assert runs[0].config_args == [str(tmp_path / "results" / "adv0.05" / "config.yaml")]
    assert runs[0].layout.data == runs[1].layout.data  # same data section: one prepare


@pytest.mark.parametrize("rows, match", [
    ([{"run": "a"}, {"run": "b", "training.pipeline.steps.1.lambda_adv": -1}],
     r"row 2 \(b\): training\.pipeline\.steps\[1\]\.lambda_adv: -1 is less than the minimum"),
    ([{"run": "a"}, {"run": "b", "training.batchsize": 4}], r"row 2 \(b\): training\.batchsize: unknown key"),
    ([{"run": "a"}, {"run": "a", "seed": 2}], r"row 2 \(a\): run: 'a' is also row 1"),
    ([{"run": "logs"}], r"row 1 \(logs\): run: 'logs' is reserved"),
    ([{"run": "a", "config": "missing.yaml"}], r"row 1 \(a\): config: missing.yaml: file not found"),
    ([{"seed": 1}], r"row 1: sweep\.runs\[0\]\.run: every row needs run"),
    ([{"run": "a"}, {"run": "vae_warmup", "training.pipeline.steps": [{"name": "other", "n_epochs": 1}]}],
     r"'vae_warmup' is a stage of run a"),
])
def test_every_row_is_checked_and_the_error_names_row_and_key(tmp_path, rows, match):
    path = sweep_file(tmp_path, rows)
    with pytest.raises(vfconfig.ConfigError, match=match):
        snakemake_runs(yaml.safe_load(path.read_text()), [path], tmp_path / "results")
    assert not (tmp_path / "results").exists()  # nothing written before every row passed


def test_snakemake_runs_write_each_rows_config_once_and_refuse_overrides(tmp_path):
    path = sweep_file(tmp_path, [{"run": "a", "seed": 3}])
    raw = yaml.safe_load(path.read_text())
    _, runs = snakemake_runs(raw, [path], tmp_path / "results")
    written = tmp_path / "results" / "a" / "config.yaml"
    assert vfconfig.load(written) == runs[0].config  # the stage commands see the DAG's config
    mtime = written.stat().st_mtime_ns
    snakemake_runs(raw, [path], tmp_path / "results")
    assert written.stat().st_mtime_ns == mtime  # unchanged row: file untouched
    with pytest.raises(ValueError, match="--config overrides"):
        snakemake_runs({**raw, "sweep": {**raw["sweep"], "name": "x"}}, [path], tmp_path / "results")
    single = tmp_path / "one.yaml"
    single.write_text(yaml.safe_dump({**tiny(), "run": "solo"}))
    name, runs = snakemake_runs(yaml.safe_load(single.read_text()), [single])
    assert name is None and runs[0].name == "solo" and runs[0].config_args == [str(single)]


def test_values_in_params_yaml_are_refused_with_the_right_command(tmp_path):
    vfconfig.check_unread_params(["config/config.yaml"], tmp_path)  # absent: fine
    (tmp_path / "params.yaml").write_text("# kept empty\n{}\n")
    vfconfig.check_unread_params(["config/config.yaml"], tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 3\ntraining:\n  pipeline: {steps: [1]}\n")
    with pytest.raises(vfconfig.ConfigError) as exc:
        vfconfig.check_unread_params(["config/config.yaml"], tmp_path)
    msg = str(exc.value)
    assert "params.yaml" in msg and "vaeflow reads config/config.yaml" in msg
    assert "dvc exp run -S 'config/config.yaml:seed=3' -S 'config/config.yaml:training.pipeline.steps=[1]'" in msg


def fake_run(run_dir: Path, config: dict, psnr: dict[str, float], val: dict[str, list[float]]):
    """A finished run's files as compare reads them: config.yaml, eval/metrics.json, metrics.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    for stage, value in psnr.items():
        (run_dir / stage / "eval").mkdir(parents=True)
        metrics = {"psnr": value, "ssim": 0.5, "lpips": {"available": False, "value": None},
                   "nll": {"iw_nll_bpd": 5.0 - value / 100}}
        (run_dir / stage / "eval" / "metrics.json").write_text(json.dumps(metrics))
        lines = [{"split": "val", "epoch": i + 1, "batch": 0, "global_step": 10 * (i + 1), "metrics": {"val_loss": v}}
                 for i, v in enumerate(val[stage])]
        (run_dir / stage / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_compare_names_the_winner_and_the_changed_keys(tmp_path):
    results = tmp_path / "results"
    base = vfconfig.validate(tiny())
    fake_run(results, base, {"vae_warmup": 10.0, "vae_gan": 11.0}, {"vae_warmup": [1, 0.5], "vae_gan": [0.4]})
    (results / "config.yaml").unlink()  # the default run has none: compare reads best.pt then
    for i, (lam, psnr) in enumerate([(0.05, 11.5), (0.3, 10.5)]):
        cfg = copy.deepcopy(base)
        cfg["run"] = f"adv{lam}"
        cfg["training"]["pipeline"]["steps"][1]["lambda_adv"] = lam
        fake_run(results / f"adv{lam}", cfg, {"vae_warmup": 10.0, "vae_gan": psnr}, {"vae_warmup": [1, 0.6], "vae_gan": [0.3]})
    (results / "data-abc" / "x").mkdir(parents=True)  # shared data is no run
    assert discover_runs(results) == ["default", "adv0.05", "adv0.3"]

    with pytest.raises(CompareError, match="best.pt"):
        compare_runs(results)  # the default run's config comes from its checkpoint
    text, files = compare_runs(results, ["adv0.3", "adv0.05"], by="psnr")
    assert "Winner by psnr (higher is better) on each run's final stage: **adv0.05** (11.5, 1 above the next (adv0.3))" in text
    assert "Config differences from the first run (adv0.3): `training.pipeline.steps.1.lambda_adv`" in text
    assert "| adv0.05 | vae_gan | 0.05 | **11.5** |" in text and "n/a" in text  # LPIPS not computed
    rows = files["csv"].read_text().splitlines()
    assert rows[0].startswith("run,stage,final,training.pipeline.steps.1.lambda_adv,psnr,ssim,lpips,iw_nll_bpd")
    assert len(rows) == 5 and files["png"].read_bytes()[:4] == b"\x89PNG"
    assert "<b>11.5</b>" in files["html"].read_text()
    _, named = compare_runs(results, ["adv0.3", "adv0.05"], name="sweep1")
    assert named["md"] == results / "compare" / "sweep1" / "compare.md"
    with pytest.raises(CompareError, match="no run 'nope'"):
        compare_runs(results, ["nope"])
    with pytest.raises(CompareError, match="--by 'active_units'"):
        compare_runs(results, by="active_units")


def test_shared_prepare_writes_where_the_named_runs_read(tmp_path, monkeypatch):
    """Snakemake's prepare_run passes the data section as JSON; the folder it writes is the one
    every run with that data section reads (vaeflow.config.run_layout)."""
    from vaeflow.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = vfconfig.validate({**tiny(), "run": "a"})
    assert main(["prepare", "--data", json.dumps(cfg["data"]), "--results", "results"]) == 0
    assert (tmp_path / vfconfig.run_layout(cfg).data / "manifest.json").is_file()
    assert not (tmp_path / "results" / "data").exists()  # the default run's folder: untouched

    (tmp_path / "params.yaml").write_text("seed: 3\n")  # what `dvc exp run -S +seed=3` leaves
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny()))
    assert main(["prepare", "--config", "c.yaml"]) == 2  # refused before anything is written
    assert not (tmp_path / "results" / "data").exists()
