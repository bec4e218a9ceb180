"""Loss curves per stage (from metrics.jsonl) and the evaluation summary across stages.

    <stage>/plots/loss_curves.png   one panel per logged metric, train and val
    <stage>/plots/train.csv         the train records, one column per metric (DVC plots)
    <stage>/plots/val.csv           the per-epoch validation records (DVC plots)
    summary.csv / .md / .html       one row per stage from <stage>/eval/metrics.json

(file names: vaeflow.layout)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import pandas as pd

from vaeflow.checkpoint import atomic_write
from vaeflow.config import VAL_OF, logged_metrics
from vaeflow.layout import StageLayout

_EVERY_MODE = {"train_vae": True, "gan_training": True, "use_lpips": True}
# Panels in the order a stage logs its metrics (both latent families).
PANEL_ORDER = list(dict.fromkeys(m for fam in ("kl", "vq") for m in logged_metrics(_EVERY_MODE, fam)["train"]))


def read_metrics_jsonl(path: str | Path) -> pd.DataFrame:
    """One row per record: split, epoch, batch, global_step and one column per metric."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        rows.append({"split": rec.get("split"), "epoch": rec.get("epoch"), "batch": rec.get("batch"),
                     "global_step": rec.get("global_step"), **(rec.get("metrics") or {})})
    cols = ["split", "epoch", "batch", "global_step"]
    df = pd.DataFrame(rows, columns=None if rows else cols)
    return df


def _metric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in ("split", "epoch", "batch", "global_step") and df[c].notna().any()]


def plot_loss_curves(df: pd.DataFrame, out: str | Path, title: str = "") -> Path:
    """One panel per train metric (with its val counterpart, if any), plus val-only metrics;
    x = optimizer step. Log y-scale where a positive series spans more than a decade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = df[df["split"] == "train"]
    val = df[df["split"] == "val"]
    t_cols, v_cols = _metric_columns(train), _metric_columns(val)
    first = {name: i for i, name in enumerate(PANEL_ORDER)}
    t_cols = sorted(t_cols, key=lambda c: (first.get(c, len(first)), t_cols.index(c)))
    panels = [(c, VAL_OF.get(c) if VAL_OF.get(c) in v_cols else None) for c in t_cols]
    paired = {v for _, v in panels if v}
    panels += [(None, v) for v in v_cols if v not in paired]
    n = max(1, len(panels))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, (tc, vc) in zip(axes.flat, panels):
        series = []
        if tc:
            s = train[["global_step", tc]].dropna()
            ax.plot(s["global_step"], s[tc], lw=1.2, label=f"train {tc}")
            series.append(s[tc])
        if vc:
            s = val[["global_step", vc]].dropna()
            ax.plot(s["global_step"], s[vc], "o-", ms=3, lw=1, label=f"val {vc}")
            series.append(s[vc])
        vals = pd.concat(series) if series else pd.Series(dtype=float)
        if len(vals) and (vals > 0).all() and vals.max() / max(vals.min(), 1e-300) > 10:
            ax.set_yscale("log")
        ax.set_title(tc or vc, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no metrics logged", ha="center", va="center")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return out


def _write_csv(df: pd.DataFrame, out: Path) -> Path:
    atomic_write(out, lambda f: f.write(df.to_csv(index=False).encode()))
    return out


def stage_curves(results: str | Path, stage: str) -> list[Path]:
    """Write a stage's loss-curve PNG and its train/val CSVs (for `dvc plots`)."""
    layout = StageLayout(results, stage)
    df = read_metrics_jsonl(layout.metrics_log)
    out = [plot_loss_curves(df, layout.curve("png"), f"{stage}: training curves")]
    for split in ("train", "val"):
        part = df[df["split"] == split] if "split" in df else df
        cols = ["epoch", "batch", "global_step", *_metric_columns(part)]
        out.append(_write_csv(part[[c for c in cols if c in part.columns]], layout.curve(split)))
    return out


# ----------------------------------------------------------------------------- summary

SUMMARY_COLUMNS = [
    ("stage", "stage"), ("epoch", "epoch"), ("global_step", "global_step"), ("weights", "weights"),
    ("test_images", "test_images"), ("mse", "mse"), ("l1", "l1"), ("psnr", "psnr"), ("ssim", "ssim"),
    ("lpips.value", "lpips"), ("rfid.value", "rfid"), ("rfid.protocol.images", "rfid_images"), ("nll.neg_elbo_nats", "neg_elbo_nats"), ("nll.neg_elbo_bpd", "neg_elbo_bpd"),
    ("nll.iw_nll_nats", "iw_nll_nats"), ("nll.iw_nll_bpd", "iw_nll_bpd"), ("nll.iw_samples", "iw_k"),
    ("nll.kl_nats", "kl_nats"), ("nll.likelihood.kind", "likelihood"), ("nll.likelihood.sigma", "sigma"),
    ("active_units.count", "active_units"), ("latent_dims", "latent_dims"), ("codebook.usage", "codebook_usage"),
    ("codebook.perplexity", "codebook_perplexity"), ("pca.mse", "pca_mse"), ("pca.psnr", "pca_psnr"),
    ("pca.ssim", "pca_ssim"), ("beats_pca", "beats_pca"),
]


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def summary_table(metrics: dict[str, dict]) -> pd.DataFrame:
    """One row per stage ({stage: metrics.json contents}, in pipeline order)."""
    rows = []
    for stage, m in metrics.items():
        row = {name: _get(m, key) for key, name in SUMMARY_COLUMNS}
        row["stage"] = stage
        rows.append(row)
    df = pd.DataFrame(rows, columns=[name for _, name in SUMMARY_COLUMNS])
    keep = {"stage", "mse", "psnr", "ssim", "lpips", "rfid"}  # these stay even when no stage could compute them
    return df[[c for c in df.columns if c in keep or df[c].notna().any()]]


def _display(df: pd.DataFrame, metrics: dict[str, dict]) -> pd.DataFrame:
    """Cells as text for Markdown/HTML: LPIPS / rFID that were not computed (no weights) read
    "n/a"; numbers from test-only random weights are marked "(not comparable)"."""
    out = df.astype(object).map(_cell)
    for col in ("lpips", "rfid"):
        if col not in out.columns:
            continue
        for i, stage in enumerate(df["stage"]):
            sec = metrics[stage].get(col) or {}
            if sec.get("available") is False:
                out.loc[i, col] = "n/a"
            elif sec.get("comparable") is False:
                out.loc[i, col] += " (not comparable)"
    return out


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.1f}"
    return str(v)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency)."""
    head = "| " + " | ".join(df.columns) + " |"
    sep = "| " + " | ".join("---" for _ in df.columns) + " |"
    body = ["| " + " | ".join(v if isinstance(v, str) else _cell(v) for v in row) + " |"
            for row in df.astype(object).itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


NOTES = [
    "Test split, EMA weights; reconstructions from the posterior mode (KL) or the quantized code (VQ).",
    "neg_elbo / iw_nll: nats per image (bpd: bits per dimension) under the stated likelihood; iw_k importance samples.",
    "lpips / rfid n/a: their weights (torchvision's backbone; torch-fidelity's InceptionV3) were not on disk: never "
    "computed with random weights (the test-only opt-ins mark such numbers not comparable); empty in the CSV.",
    "rfid: Fréchet Inception distance between the first rfid_images test images and their reconstructions "
    "(protocol in each stage's metrics.json under rfid.protocol).",
    "PCA: the same number of components as latent dimensions, fit on the train split.",
]


def write_summary(metrics: dict[str, dict], csv: str | Path, md: str | Path, html: str | Path | None = None) -> pd.DataFrame:
    df = summary_table(metrics)
    atomic_write(csv, lambda f: f.write(df.to_csv(index=False).encode()))
    shown = _display(df, metrics)
    text = "# Evaluation summary\n\n" + to_markdown(shown) + "\n" + "\n".join(f"- {n}" for n in NOTES) + "\n"
    atomic_write(md, lambda f: f.write(text.encode()))
    if html is not None:
        table = shown.to_html(index=False, border=0, classes="vaeflow-summary")
        notes = "".join(f"<li>{n}</li>" for n in NOTES)
        page = (
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>vaeflow evaluation summary</title>"
            "<style>body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
            "td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}</style></head><body>"
            f"<h2>Evaluation summary</h2>{table}<ul>{notes}</ul></body></html>\n"
        )
        atomic_write(html, lambda f: f.write(page.encode()))
    return df


def iter_stage_metrics(results: str | Path, stages: Iterable[str]) -> dict[str, dict]:
    """{stage: metrics.json contents} for the stages that have one."""
    out = {}
    for s in stages:
        p = StageLayout(results, s).eval_metrics
        if p.exists():
            out[s] = json.loads(p.read_text())
    return out
