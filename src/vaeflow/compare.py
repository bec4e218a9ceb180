"""Runs side by side: `vaeflow compare [RUN ...]` (and a sweep's Snakemake target).

    compare.csv    one row per run and stage: the run's config differences from the first
                   run, then the stage's test metrics (long format, plain values)
    compare.md     the final stage of each run first (the winner named above it, the best
    compare.html   value of each metric in bold), then one table per stage
    val_curves.png validation losses of every run overlaid, one panel per stage and loss

Under results/compare/ (or results/compare/<sweep>/; file names: vaeflow.layout). A run is
the default run ("default": results/ itself) or a named run (results/<run>/). Its config is
its sweep row's results/<run>/config.yaml, else the one its last stage's checkpoint carries.
"""

from __future__ import annotations

import html as htmllib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from vaeflow.checkpoint import atomic_write
from vaeflow.config import ConfigError, load_yaml, stage_names
from vaeflow.layout import DEFAULT_RUN, EVAL_METRICS, RESULTS, Layout, StageLayout, reserved_run_name
from vaeflow.report import Table, _cell, _get, finish_panels, read_metrics_jsonl, to_markdown

# (metrics.json key, column, better): the columns a comparison shows when any run has them.
METRICS = [
    ("psnr", "psnr", "max"), ("ssim", "ssim", "max"), ("lpips.value", "lpips", "min"), ("rfid.value", "rfid", "min"),
    ("mse", "mse", "min"), ("l1", "l1", "min"), ("nll.neg_elbo_bpd", "neg_elbo_bpd", "min"),
    ("nll.iw_nll_bpd", "iw_nll_bpd", "min"), ("nll.iw_nll_nats", "iw_nll_nats", "min"),
    ("active_units.count", "active_units", None), ("codebook.usage", "codebook_usage", None),
]
BETTER = {col: better for _, col, better in METRICS}
IGNORED_KEYS = ("run",)  # differs by construction


class CompareError(ValueError):
    pass


@dataclass
class RunRecord:
    name: str
    config: dict
    stages: dict[str, dict]  # stage -> metrics.json, in pipeline order
    layout: Layout

    @property
    def final(self) -> str:
        return list(self.stages)[-1]


def run_layout_of(results: str | Path, name: str) -> Layout:
    return Layout(results) if name == DEFAULT_RUN else Layout(results, run=name)


def _evaluated_stages(run_dir: Path) -> list[str]:
    if not run_dir.is_dir():
        return []
    return [d.name for d in run_dir.iterdir() if (StageLayout(run_dir, d.name).eval_metrics).is_file()]


def discover_runs(results: str | Path = RESULTS) -> list[str]:
    """Every run under results/ with at least one evaluated stage: the default run first (when
    results/ holds one), then the named runs by name."""
    root = Path(results)
    if not root.is_dir():
        return []
    named = sorted(d.name for d in root.iterdir()
                   if d.is_dir() and not reserved_run_name(d.name) and _evaluated_stages(d)
                   and not StageLayout(root, d.name).eval_metrics.is_file())
    default_stages = [s for s in _evaluated_stages(root) if s not in named]
    return ([DEFAULT_RUN] if default_stages else []) + named


def _run_config(layout: Layout, evaluated: list[str]) -> dict:
    if layout.run_config.is_file():
        return load_yaml(layout.run_config)
    from vaeflow.checkpoint import load_vaeflow

    ckpts = [layout.stage(s).best for s in evaluated if layout.stage(s).best.is_file()]
    if not ckpts:
        raise CompareError(f"{layout.run_dir}: no config.yaml and no best.pt to read the run's config from")
    latest = max(ckpts, key=lambda p: p.stat().st_mtime)
    return load_vaeflow(latest)["config"]


def read_run(results: str | Path, name: str) -> RunRecord:
    layout = run_layout_of(results, name)
    evaluated = _evaluated_stages(layout.run_dir)
    if name != DEFAULT_RUN and not layout.run_dir.is_dir():
        raise CompareError(f"no run {name!r}: {layout.run_dir} does not exist (runs there: "
                           f"{', '.join(discover_runs(results)) or 'none'})")
    if name == DEFAULT_RUN:
        named = set(discover_runs(results)) - {DEFAULT_RUN}
        evaluated = [s for s in evaluated if s not in named]
    if not evaluated:
        raise CompareError(f"run {name!r} has no evaluated stage ({layout.run_dir}/<stage>/{EVAL_METRICS}): run it first")
    config = _run_config(layout, evaluated)
    try:
        order = stage_names(config)
    except (KeyError, TypeError):
        order = []
    ordered = [s for s in order if s in evaluated] + sorted(s for s in evaluated if s not in order)
    stages = {s: json.loads(layout.stage(s).eval_metrics.read_text()) for s in ordered}
    return RunRecord(name, config, stages, layout)


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """Dotted keys (a list item by its index: training.pipeline.steps.1.lambda_adv)."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        items = enumerate(obj)
    else:
        return {prefix: obj}
    out: dict[str, object] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(runs: list[RunRecord]) -> list[str]:
    """The dotted keys whose value differs from the first run's in any run (first-run order)."""
    flat = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    missing = object()
    return [k for k in keys if k not in IGNORED_KEYS
            and any(f.get(k, missing) != flat[0].get(k, missing) for f in flat[1:])]


def _value(v) -> object:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def compare_table(runs: list[RunRecord], diffs: list[str]) -> Table:
    """Long format: one row per run and stage."""
    flat = [flatten(r.config) for r in runs]
    shown_anyway = ("lpips", "rfid")  # "n/a" says they were not computed (no weights on disk)
    metric_cols = [col for key, col, _ in METRICS
                   if any(_get(m, key) is not None or (col in shown_anyway and col in m)
                          for r in runs for m in r.stages.values())]
    rows = []
    for run, f in zip(runs, flat):
        for stage, m in run.stages.items():
            row = {"run": run.name, "stage": stage, "final": stage == run.final}
            row.update({k: _value(f.get(k)) for k in diffs})
            row.update({col: _get(m, key) for key, col, _ in METRICS if col in metric_cols})
            rows.append(row)
    return Table(["run", "stage", "final", *diffs, *metric_cols], rows)


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and not isinstance(v, bool)


def best_rows(rows: list[dict], columns: list[str]) -> dict[str, set[int]]:
    """For each metric column with a direction: the indices of the rows holding its best value."""
    out = {}
    for col in columns:
        better = BETTER.get(col)
        values = [(i, r.get(col)) for i, r in enumerate(rows) if _present(r.get(col))]
        if not better or len(values) < 2:
            continue
        best = (max if better == "max" else min)(v for _, v in values)
        if all(v == best for _, v in values):
            continue  # a tie everywhere: nothing to point at
        out[col] = {i for i, v in values if v == best}
    return out


def winner(rows: list[dict], by: str) -> str:
    """One sentence naming the run that won on metric `by` (and by how much)."""
    values = [(r["run"], r.get(by)) for r in rows if _present(r.get(by))]
    if not values:
        return f"No run has {by}: no winner."
    better = BETTER.get(by) or "max"
    ordered = sorted(values, key=lambda rv: rv[1], reverse=better == "max")
    (name, v), rest = ordered[0], ordered[1:]
    margin = f", {abs(v - rest[0][1]):.4g} {'above' if better == 'max' else 'below'} the next ({rest[0][0]})" if rest else ""
    return f"Winner by {by} ({'higher' if better == 'max' else 'lower'} is better) on each run's final stage: **{name}** ({_cell(v)}{margin})."


def _display(rows: list[dict], columns: list[str], runs: dict[str, RunRecord], html: bool) -> list[dict]:
    bests = best_rows(rows, columns)
    out = []
    for i, r in enumerate(rows):
        shown = {}
        for c in columns:
            v = r.get(c)
            text = _cell(v) if not isinstance(v, str) else v
            if c in ("lpips", "rfid") and c in r:
                sec = runs[r["run"]].stages[r["stage"]].get(c) or {}
                if sec.get("available") is False:
                    text = "n/a"
                elif sec.get("comparable") is False:
                    text += " (not comparable)"
            if i in bests.get(c, ()):
                text = f"<b>{htmllib.escape(text)}</b>" if html else f"**{text}**"
            elif html:
                text = htmllib.escape(text)
            shown[c] = text
        out.append(shown)
    return out


def _sections(table: Table, runs: dict[str, RunRecord]) -> list[tuple[str, list[dict]]]:
    final = [r for r in table.rows if r["final"]]
    stages = list(dict.fromkeys(r["stage"] for r in table.rows))
    return [("Final stage of each run", final)] + [(f"Stage {s}", [r for r in table.rows if r["stage"] == s]) for s in stages]


def plot_val_curves(runs: list[RunRecord], out: str | Path) -> Path:
    """Every run's validation losses overlaid: one panel per stage and logged val metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list] = {}
    for run in runs:
        for stage in run.stages:
            log = run.layout.stage(stage).metrics_log
            if not log.is_file():
                continue
            val = read_metrics_jsonl(log).where("split", "val")
            for col in val.columns[4:]:
                pts = [(r["global_step"], r[col]) for r in val.rows if r.get(col) is not None and r.get("global_step") is not None]
                if pts:
                    series.setdefault((stage, col), []).append((run.name, pts))
    panels = list(series)
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.1 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        for name, pts in series[key]:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1.2, label=name)
    finish_panels(fig, axes, [f"{stage}: {col}" for stage, col in panels], "no validation records",
                  "Validation losses by run")
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return Path(out)


def compare_runs(results: str | Path = RESULTS, names: list[str] | None = None, name: str | None = None,
                 by: str = "psnr") -> tuple[str, dict[str, Path]]:
    """Write the comparison of `names` (default: every run under results/); returns the
    Markdown text and the files written."""
    if by not in BETTER or BETTER[by] is None:
        raise CompareError(f"--by {by!r}: choose one of {', '.join(c for c, b in BETTER.items() if b)}")
    names = list(dict.fromkeys(names or discover_runs(results)))
    if not names:
        raise CompareError(f"no evaluated runs under {results}: run a pipeline first")
    try:
        runs = [read_run(results, n) for n in names]
    except ConfigError as exc:
        raise CompareError(str(exc)) from None
    diffs = config_differences(runs)
    table = compare_table(runs, diffs)
    by_name = {r.name: r for r in runs}
    files = Layout(results).compare_files(name)
    atomic_write(files["csv"], lambda f: f.write(table.to_csv().encode()))
    cols = [c for c in table.columns if c != "final"]
    head = [f"# Run comparison: {', '.join(names)}", "",
            winner([r for r in table.rows if r["final"]], by), "",
            f"Config differences from the first run ({names[0]}): "
            + (", ".join(f"`{d}`" for d in diffs) if diffs else "none") + ". Best value per metric in bold.", ""]
    md = list(head)
    html_parts = []
    for title, rows in _sections(table, by_name):
        md += [f"## {title}", "", to_markdown(Table(cols, _display(rows, cols, by_name, html=False))), ""]
        shown = _display(rows, cols, by_name, html=True)
        hrow = "".join(f"<th>{htmllib.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{r[c]}</td>" for c in cols) + "</tr>" for r in shown)
        html_parts.append(f"<h3>{htmllib.escape(title)}</h3><table><thead><tr>{hrow}</tr></thead><tbody>{body}</tbody></table>")
    text = "\n".join(md)
    atomic_write(files["md"], lambda f: f.write(text.encode()))
    win = htmllib.escape(winner([r for r in table.rows if r["final"]], by)).replace("**", "")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>vaeflow run comparison</title>"
            "<style>body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
            "td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}</style></head><body>"
            f"<h2>Run comparison</h2><p>{win}</p><p>{htmllib.escape(head[4])}</p>{''.join(html_parts)}</body></html>\n")
    atomic_write(files["html"], lambda f: f.write(page.encode()))
    plot_val_curves(runs, files["png"])
    return text, files
