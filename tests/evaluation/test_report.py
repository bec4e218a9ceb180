"""Loss curves from metrics.jsonl and the summary across stages."""

from __future__ import annotations

import json

import pandas as pd
import yaml
from PIL import Image

from .conftest import TINY
from vaeflow import report as R
from vaeflow.cli import main


def _jsonl(path, gan=False):
    lines = []
    step = 0
    for epoch in (1, 2, 3):
        for batch in (2, 4):
            step += 2
            m = {"vae_loss": 1.0 / step, "recon_loss": 0.8 / step, "kl_loss": 3.0 + step, "beta": 1e-6}
            if gan:
                m |= {"g_loss": -0.1 * step, "d_loss": 1.0}
            lines.append({"split": "train", "epoch": epoch, "batch": batch, "global_step": step, "metrics": m})
        lines.append({"split": "val", "epoch": epoch, "batch": 4, "global_step": step,
                      "metrics": {"val_loss": 0.9 / step, "val_recon": 0.7 / step, "val_kl": 2.5 + step}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"timestamp": "t", "session_id": "s", "stage": "x", **r}) + "\n" for r in lines))


def test_curves_png_and_tables(tmp_path):
    _jsonl(tmp_path / "st" / "metrics.jsonl", gan=True)
    paths = R.stage_curves(tmp_path, "st")
    assert [p.name for p in paths] == ["loss_curves.png", "train.csv", "val.csv"]
    with Image.open(paths[0]) as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 500  # 3 rows of panels
    train = pd.read_csv(paths[1])
    assert list(train.columns) == ["epoch", "batch", "global_step", "vae_loss", "recon_loss", "kl_loss", "beta", "g_loss", "d_loss"]
    assert len(train) == 6 and train["global_step"].tolist() == [2, 4, 6, 8, 10, 12]
    val = pd.read_csv(paths[2])
    assert list(val.columns) == ["epoch", "batch", "global_step", "val_loss", "val_recon", "val_kl"] and len(val) == 3


def test_summary_across_stages(tmp_path):
    kl = {"stage": "a", "epoch": 3, "global_step": 30, "weights": "ema", "test_images": 10, "mse": 0.01, "l1": 0.05,
          "psnr": 20.0, "ssim": 0.9, "lpips": {"available": False, "reason": "no weights"}, "latent_dims": 16,
          "rfid": {"available": False, "reason": "no weights"},
          "nll": {"neg_elbo_nats": 100.0, "neg_elbo_bpd": 0.2, "iw_nll_nats": 95.0, "iw_nll_bpd": 0.19, "iw_samples": 64,
                  "kl_nats": 10.0, "likelihood": {"kind": "bernoulli"}},
          "active_units": {"count": 12}, "codebook": {"available": False}, "pca": {"mse": 0.02, "psnr": 17.0, "ssim": 0.8},
          "beats_pca": True}
    vq = {"stage": "b", "mse": 0.02, "psnr": 17.0, "ssim": 0.8, "lpips": {"available": True, "value": 0.123},
          "rfid": {"available": True, "comparable": False, "value": 12.5, "protocol": {"images": 500}},
          "nll": {"available": False}, "active_units": {"count": 30}, "latent_dims": 32,
          "codebook": {"usage": 0.5, "perplexity": 40.2}, "pca": {"mse": 0.01, "psnr": 20.0}, "beats_pca": False}
    df = R.write_summary({"a": kl, "b": vq}, tmp_path / "s.csv", tmp_path / "s.md", tmp_path / "s.html")
    csv = pd.read_csv(tmp_path / "s.csv")
    assert csv["stage"].tolist() == ["a", "b"] and list(csv.columns) == list(df.columns)
    row = csv.set_index("stage")
    assert row.loc["a", "iw_nll_nats"] == 95.0 and pd.isna(row.loc["a", "lpips"]) and row.loc["b", "lpips"] == 0.123
    assert pd.isna(row.loc["b", "iw_nll_nats"]) and row.loc["b", "codebook_perplexity"] == 40.2
    md = (tmp_path / "s.md").read_text()
    assert "| stage | epoch |" in md and "| a | 3 | 30 | ema |" in md and "| yes |" in md
    assert "| 0.9 | n/a | n/a |  | 100 |" in md  # LPIPS / rFID without weights: n/a, not a number
    assert "| 0.8 | 0.123 | 12.5 (not comparable) | 500 |" in md  # test-only weights: marked
    assert row.loc["b", "rfid"] == 12.5 and row.loc["b", "rfid_images"] == 500 and pd.isna(row.loc["a", "rfid"])
    html = (tmp_path / "s.html").read_text()
    assert "<table" in html and "95" in html and "Evaluation summary" in html


def test_cli_curves_and_summary(kl_run, tmp_path, capsys):
    results = tmp_path / "results"
    _jsonl(results / "vae_warmup" / "metrics.jsonl")
    _jsonl(results / "vae_gan" / "metrics.jsonl", gan=True)
    assert main(["curves", "--results", str(results), "--stage", "vae_gan"]) == 0
    assert (results / "vae_gan" / "plots" / "loss_curves.png").exists()
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(TINY.read_text())
    assert main(["summary", "--config", str(cfg_path), "--results", str(results)]) == 2  # no eval yet
    assert "run evaluate first" in capsys.readouterr().err
    for stage in ("vae_warmup", "vae_gan"):
        (results / stage / "eval").mkdir(parents=True)
        (results / stage / "eval" / "metrics.json").write_text(json.dumps({"stage": stage, "mse": 0.1, "psnr": 10.0}))
    assert main(["summary", "--config", str(cfg_path), "--results", str(results)]) == 0
    stages = pd.read_csv(results / "summary.csv")["stage"].tolist()
    assert stages == [s["name"] for s in yaml.safe_load(TINY.read_text())["training"]["pipeline"]["steps"]]
    assert (results / "summary.md").exists() and (results / "summary.html").exists()
    assert "| stage | mse | psnr | ssim | lpips |" in (results / "summary.md").read_text()  # lpips column kept, empty


def test_curves_writes_the_files_the_runners_declare(tmp_path):
    """rules/report.smk and dvc.yaml declare Layout.outputs; `vaeflow curves` writes exactly those."""
    from vaeflow.layout import Layout

    _jsonl(tmp_path / "st" / "metrics.jsonl")
    written = R.stage_curves(tmp_path, "st")
    assert [str(p) for p in written] == Layout(tmp_path).outputs("st", "best")["curves"]
