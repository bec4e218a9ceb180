"""Runs of one Snakemake invocation: a config file (the default run, or a named run with
`run:`), or a sweep file whose rows are named runs (docs/experiments.md).

A sweep file is a sample sheet: each row a run name, a base config and dotted-key overrides
(`training.pipeline.steps.1.lambda_adv: 0.05`; a number indexes a list)::

    sweep:
      name: lambda_adv            # optional: results/compare/<name>/ (default: the file's stem)
      base: config/config.yaml    # optional: the config of rows that name none
      runs:
        - {run: adv0.05, training.pipeline.steps.1.lambda_adv: 0.05}
        - {run: adv0.2, training.pipeline.steps.1.lambda_adv: 0.2}
        - {run: celeba, config: config/celeba.yaml}

Every row is resolved and validated when the Snakefile is read, before any job starts; an
error names the file, the row and the key. Each row's resolved config is written to
results/<run>/config.yaml (only when it changed), and that file is what its stage commands
read, so the commands see exactly the config the DAG was built from.

Torch-free (the Snakefile imports it).
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vaeflow.config import ConfigError, deep_merge, load_yaml, run_layout, stage_names, validate
from vaeflow.layout import RESULTS, Layout

SWEEP = "sweep"
DEFAULT_BASE = "config/config.yaml"
ROW_KEYS = ("run", "config")  # a row's own columns; every other key is a dotted override
SWEEP_KEYS = ("name", "base", "runs")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Run:
    """One run of an invocation: its validated config, the files its stage commands read,
    and its paths."""

    name: str | None  # None: the default run (results/ itself)
    config: dict
    config_args: list[str]
    layout: Layout = field(repr=False)
    row: int | None = None  # 1-based row of a sweep file

    @property
    def stages(self) -> list[str]:
        return stage_names(self.config)

    @property
    def args(self) -> str:
        return " ".join(self.config_args)


def is_sweep(raw: dict) -> bool:
    return isinstance(raw, dict) and SWEEP in raw


def set_dotted(config: dict, dotted: str, value, source: str) -> None:
    """config[a][b][1][c] = value for "a.b.1.c"; a list index must exist, a missing mapping is
    created (the schema then names an unknown key)."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(dotted, "an override key is dotted key names (training.pipeline.steps.1.lambda_adv)", source)
    node = config
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(where, f"{'.'.join(parts[:i]) or '<root>'} is a list of {len(node)} item(s): "
                                  f"index 0 to {len(node) - 1}, got {part!r}", source)
            key = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            raise ConfigError(where, f"{'.'.join(parts[:i])} is {type(node).__name__} {node!r}, not a mapping or list", source)
        if last:
            node[key] = copy.deepcopy(value)
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def _as_list(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def resolve_sweep(raw: dict, source: str, root: str | Path = RESULTS) -> tuple[str, list[Run]]:
    """(sweep name, one Run per row), every row validated; ConfigError names the row and key."""
    sweep = raw[SWEEP]
    extra = sorted(set(raw) - {SWEEP})
    if extra:
        raise ConfigError(extra[0], f"unknown key next to sweep: (a sweep file holds only sweep:)", source)
    if not isinstance(sweep, dict):
        raise ConfigError(SWEEP, "expected a mapping with runs: (a list of rows)", source)
    extra = sorted(set(sweep) - set(SWEEP_KEYS))
    if extra:
        raise ConfigError(f"{SWEEP}.{extra[0]}", f"unknown key (allowed here: {', '.join(SWEEP_KEYS)})", source)
    name = str(sweep.get("name") or Path(source).stem)
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"{SWEEP}.name", f"{name!r} must match {NAME_PATTERN.pattern} (it names results/compare/<name>/)", source)
    rows = sweep.get("runs")
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{SWEEP}.runs", "expected a non-empty list of rows ({run: NAME, config: FILE, dotted.key: value})", source)
    base = sweep.get("base", DEFAULT_BASE)
    runs: list[Run] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, 1):
        label = f"{source}, row {i}"
        if not isinstance(row, dict) or not isinstance(row.get("run"), str):
            raise ConfigError(f"{SWEEP}.runs[{i - 1}].run", "every row needs run: NAME (its folder results/NAME/)", label)
        run = row["run"]
        label = f"{source}, row {i} ({run})"
        if run in seen:
            raise ConfigError("run", f"{run!r} is also row {seen[run]}: every row needs its own name", label)
        seen[run] = i
        files = _as_list(row.get("config", base))
        merged: dict = {}
        for f in files:
            try:
                merged = deep_merge(merged, load_yaml(f))
            except ConfigError as exc:
                raise ConfigError("config", f"{f}: {str(exc).split(': ', 1)[-1].removeprefix('<root>: ')}", label) from None
        if merged.get("run") not in (None, run):
            merged.pop("run")  # the row names the run; a base config's own name does not carry over
        for key, value in row.items():
            if key not in ROW_KEYS:
                set_dotted(merged, str(key), value, label)
        merged["run"] = run
        config = validate(merged, source=label)
        runs.append(Run(run, config, [str(run_layout(config, root).run_config)], run_layout(config, root), row=i))
    check_runs(runs, source)
    return name, runs


def check_runs(runs: list[Run], source: str) -> None:
    """Across the runs of one invocation: no run folder is another run's stage folder, and
    the SLURM node count of the train rule is one number (every run's training jobs are
    submitted with the same resources)."""
    stages = {s: r for r in runs for s in r.stages}
    for r in runs:
        if r.name in stages:
            other = stages[r.name]
            raise ConfigError("run", f"{r.name!r} is a stage of run {other.name or 'default'}: results/{r.name}/ would hold both",
                              f"{source}, row {r.row} ({r.name})" if r.row else source)
    nnodes = {r.config["training"]["distributed"]["nnodes"]: r for r in runs}
    if len(nnodes) > 1 and max(nnodes) > 1:
        a, b = sorted(nnodes)[:2]
        raise ConfigError("training.distributed.nnodes", f"runs {nnodes[a].name} and {nnodes[b].name} differ ({a} vs {b}): "
                          "one invocation submits every run's training with one node count; sweep multi-node runs separately",
                          source)


def write_run_configs(runs: list[Run]) -> list[Path]:
    """Each sweep row's resolved config to results/<run>/config.yaml, atomically and only when
    its content changed (the file's modification time then says when the row last changed)."""
    written = []
    for r in runs:
        if r.row is None:
            continue
        path = r.layout.run_config
        text = (f"# Resolved from a sweep row (run {r.name}): the config its stage commands read. "
                "Edit the sweep file, not this file.\n") + yaml.safe_dump(r.config, sort_keys=False)
        if path.is_file() and path.read_text() == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        written.append(path)
    return written


def snakemake_runs(config: dict, configfiles: list, root: str | Path = RESULTS) -> tuple[str | None, list[Run]]:
    """The runs of a Snakemake invocation from its `config` and --configfile files: (sweep name
    or None, runs). Refuses --config overrides, which the stage commands would not see."""
    files = [str(p) for p in configfiles]
    overrides = "--config overrides are not passed to the stage commands (nor to DVC): " \
                "put the change in a config file (or a sweep row) and pass it with --configfile"
    if is_sweep(config):
        if len(files) != 1:
            raise ConfigError(SWEEP, "a sweep file is the only --configfile of its invocation", ", ".join(files))
        if load_yaml(files[0]) != config:
            raise ValueError(overrides)
        name, runs = resolve_sweep(config, files[0], root)
        write_run_configs(runs)
        return name, runs
    source = ", ".join(files)
    vf = validate(config, source=source)
    merged: dict = {}
    for f in files:
        merged = deep_merge(merged, load_yaml(f))
    if validate(merged, source=source) != vf:
        raise ValueError(overrides)
    return None, [Run(vf.get("run"), vf, files, run_layout(vf, root))]
