"""Loss curves per stage (from metrics.jsonl) and the evaluation summary across stages.

    <stage>/plots/loss_curves.png   one panel per logged metric, train and val
    <stage>/plots/train.csv         the train records, one column per metric (DVC plots)
    <stage>/plots/val.csv           the per-epoch validation records (DVC plots)
    summary.csv / .md / .html       one row per stage from <stage>/eval/metrics.json

(file names: vaeflow.layout). Plain lists and the csv module, no pandas: its import was
0.4 CPU-s of each of these jobs, and the summary is on the pipeline's critical path.
"""

from __future__ import annotations

import csv
import html as htmllib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from vaeflow.checkpoint import atomic_write
from vaeflow.config import VAL_OF, logged_metrics
from vaeflow.layout import StageLayout

_EVERY_MODE = {"train_vae": True, "gan_training": True, "use_lpips": True}
# Panels in the order a stage logs its metrics (both latent families).
PANEL_ORDER = list(dict.fromkeys(m for fam in ("kl", "vq") for m in logged_metrics(_EVERY_MODE, fam)["train"]))
INDEX_COLUMNS = ["split", "epoch", "batch", "global_step"]


@dataclass
class Table:
    """Rows of one schema: `columns` in order, each row a dict (None: no value)."""

    columns: list[str]
    rows: list[dict]

    def column(self, name: str) -> list:
        return [r.get(name) for r in self.rows]

    def where(self, name: str, value) -> "Table":
        return Table(self.columns, [r for r in self.rows if r.get(name) == value])

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows([_csv_cell(r.get(c)) for c in self.columns] for r in self.rows)
        return out.getvalue()


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _csv_cell(v):
    return "" if not _present(v) else v


def read_metrics_jsonl(path: str | Path) -> Table:
    """One row per record: split, epoch, batch, global_step and one column per metric (in
    the order they first appear)."""
    rows, columns = [], dict.fromkeys(INDEX_COLUMNS)
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        row = {"split": rec.get("split"), "epoch": rec.get("epoch"), "batch": rec.get("batch"),
               "global_step": rec.get("global_step"), **(rec.get("metrics") or {})}
        columns.update(dict.fromkeys(row))
        rows.append(row)
    return Table(list(columns), rows)


def _metric_columns(table: Table) -> list[str]:
    return [c for c in table.columns if c not in INDEX_COLUMNS and any(_present(v) for v in table.column(c))]


def _points(table: Table, col: str) -> tuple[list, list]:
    pts = [(r.get("global_step"), r.get(col)) for r in table.rows if _present(r.get(col)) and _present(r.get("global_step"))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_loss_curves(table: Table, out: str | Path, title: str = "") -> Path:
    """One panel per train metric (with its val counterpart, if any), plus val-only metrics;
    x = optimizer step. Log y-scale where a positive series spans more than a decade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = table.where("split", "train"), table.where("split", "val")
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
        vals: list = []
        if tc:
            x, y = _points(train, tc)
            ax.plot(x, y, lw=1.2, label=f"train {tc}")
            vals += y
        if vc:
            x, y = _points(val, vc)
            ax.plot(x, y, "o-", ms=3, lw=1, label=f"val {vc}")
            vals += y
        if vals and all(v > 0 for v in vals) and max(vals) / max(min(vals), 1e-300) > 10:
            ax.set_yscale("log")
    finish_panels(fig, axes, [tc or vc for tc, vc in panels], "no metrics logged", title)
    out = Path(out)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return out


def _write_csv(table: Table, out: Path) -> Path:
    atomic_write(out, lambda f: f.write(table.to_csv().encode()))
    return out


def stage_curves(results: str | Path, stage: str) -> list[Path]:
    """Write a stage's loss-curve PNG and its train/val CSVs (for `dvc plots`)."""
    layout = StageLayout(results, stage)
    table = read_metrics_jsonl(layout.metrics_log)
    out = [plot_loss_curves(table, layout.curve("png"), f"{stage}: training curves")]
    for split in ("train", "val"):
        part = table.where("split", split)
        cols = ["epoch", "batch", "global_step", *_metric_columns(part)]
        out.append(_write_csv(Table(cols, part.rows), layout.curve(split)))
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


def summary_table(metrics: dict[str, dict]) -> Table:
    """One row per stage ({stage: metrics.json contents}, in pipeline order)."""
    rows = []
    for stage, m in metrics.items():
        row = {name: _get(m, key) for key, name in SUMMARY_COLUMNS}
        row["stage"] = stage
        rows.append(row)
    keep = {"stage", "mse", "psnr", "ssim", "lpips", "rfid"}  # these stay even when no stage could compute them
    cols = [name for _, name in SUMMARY_COLUMNS if name in keep or any(_present(r[name]) for r in rows)]
    return Table(cols, [{c: r[c] for c in cols} for r in rows])


def _display(table: Table, metrics: dict[str, dict]) -> Table:
    """Cells as text for Markdown/HTML: LPIPS / rFID that were not computed (no weights) read
    "n/a"; numbers from test-only random weights are marked "(not comparable)"."""
    rows = []
    for row in table.rows:
        shown = {c: _cell(row[c]) for c in table.columns}
        for col in ("lpips", "rfid"):
            if col not in shown:
                continue
            sec = metrics[row["stage"]].get(col) or {}
            if sec.get("available") is False:
                shown[col] = "n/a"
            elif sec.get("comparable") is False:
                shown[col] += " (not comparable)"
        rows.append(shown)
    return Table(table.columns, rows)


def _cell(v) -> str:
    if not _present(v):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.1f}"
    return str(v)


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table (no tabulate dependency)."""
    head = "| " + " | ".join(table.columns) + " |"
    sep = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = ["| " + " | ".join(v if isinstance(v, str) else _cell(v) for v in (r.get(c) for c in table.columns)) + " |"
            for r in table.rows]
    return "\n".join([head, sep, *body]) + "\n"


def to_html(table: Table) -> str:
    esc = htmllib.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(r.get(c, '')))}</td>" for c in table.columns) + "</tr>"
                   for r in table.rows)
    return f"<table class='vaeflow-summary'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


NOTES = [
    "Test split, EMA weights; reconstructions from the posterior mode (KL) or the quantized code (VQ).",
    "neg_elbo / iw_nll: nats per image (bpd: bits per dimension) under the stated likelihood; iw_k importance samples.",
    "lpips / rfid n/a: their weights (torchvision's backbone; torch-fidelity's InceptionV3) were not on disk: never "
    "computed with random weights (the test-only opt-ins mark such numbers not comparable); empty in the CSV.",
    "rfid: Fréchet Inception distance between the first rfid_images test images and their reconstructions "
    "(protocol in each stage's metrics.json under rfid.protocol).",
    "PCA: the same number of components as latent dimensions, fit on the train split.",
]


def write_summary(metrics: dict[str, dict], csv_path: str | Path, md: str | Path, html: str | Path | None = None) -> Table:
    table = summary_table(metrics)
    atomic_write(csv_path, lambda f: f.write(table.to_csv().encode()))
    shown = _display(table, metrics)
    text = "# Evaluation summary\n\n" + to_markdown(shown) + "\n" + "\n".join(f"- {n}" for n in NOTES) + "\n"
    atomic_write(md, lambda f: f.write(text.encode()))
    if html is not None:
        notes = "".join(f"<li>{htmllib.escape(n)}</li>" for n in NOTES)
        page = (
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>vaeflow evaluation summary</title>"
            "<style>body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
            "td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}</style></head><body>"
            f"<h2>Evaluation summary</h2>{to_html(shown)}<ul>{notes}</ul></body></html>\n"
        )
        atomic_write(html, lambda f: f.write(page.encode()))
    return table


def iter_stage_metrics(results: str | Path, stages: Iterable[str]) -> dict[str, dict]:
    """{stage: metrics.json contents} for the stages that have one."""
    out = {}
    for s in stages:
        p = StageLayout(results, s).eval_metrics
        if p.exists():
            out[s] = json.loads(p.read_text())
    return out


def finish_panels(fig, axes, titles: list[str], empty: str, title: str) -> None:
    """The curve figures' common look: each panel titled, labelled and with its legend, spare
    axes blank (`empty` in the first when there is no panel), the figure's title."""
    for ax, name in zip(axes.flat, titles):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(titles):]:
        ax.axis("off")
    if not titles:
        axes.flat[0].text(0.5, 0.5, empty, ha="center", va="center")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
