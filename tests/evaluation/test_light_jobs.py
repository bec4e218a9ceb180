"""The curves and summary jobs read JSON and draw with matplotlib: they never import torch
(seconds per job start-up on a 2-core machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from .conftest import TINY
from .test_report import _jsonl

PROBE = "import sys; from vaeflow.cli import main; rc = main(sys.argv[1:]); print(rc, 'torch' in sys.modules)"


def run_cli(*args, cwd) -> list[str]:
    res = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()[-2:]


def test_curves_and_summary_run_without_torch(tmp_path):
    results = tmp_path / "results"
    config = yaml.safe_load(TINY.read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    for stage in ("vae_warmup", "vae_gan"):
        _jsonl(results / stage / "metrics.jsonl", gan=stage == "vae_gan")
        (results / stage / "eval").mkdir(parents=True)
        (results / stage / "eval" / "metrics.json").write_text(json.dumps(
            {"stage": stage, "mse": 0.01, "psnr": 20.0, "ssim": 0.9, "lpips": {"available": False, "reason": "r"}}))
    assert run_cli("curves", "--results", str(results), "--stage", "vae_gan", cwd=tmp_path) == ["0", "False"]
    assert (results / "vae_gan" / "plots" / "loss_curves.png").stat().st_size > 1000
    out = run_cli("summary", "--config", "config.yaml", "--results", str(results), cwd=tmp_path)
    assert out == ["0", "False"]
    assert "vae_gan" in (results / "summary.md").read_text()
