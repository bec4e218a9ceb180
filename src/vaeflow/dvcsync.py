"""Make Snakemake trust outputs that `dvc pull` / `dvc checkout` restored.

DVC does not keep modification times, so after a pull an output can look older than
its inputs and Snakemake would rerun it. For each stage in dvc.lock whose outputs look
older than its deps, we ask DVC (`dvc status`) whether the stage's deps, params and
outs still match dvc.lock; only for those it vouches for are the outs' mtimes set after
their deps', in DAG order. A real change still triggers a rerun. Cheap when nothing is
out of order: DVC is only asked when some stage's mtimes are inverted.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from vaeflow.config import safe_load

from vaeflow.provenance import CODE_DIR


def _unchanged_stages(root: Path, names: list[str]) -> set[str]:
    """The stages among `names` whose deps, params and outs all match dvc.lock, per `dvc status`."""
    try:
        res = subprocess.run(["dvc", "status", "--json"], cwd=root, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    if res.returncode != 0:
        return set()
    try:
        changed = json.loads(res.stdout or "{}")
    except json.JSONDecodeError:
        return set()
    return {n for n in names if n not in changed}


def _order(stages: dict) -> list[str]:
    produced = {o["path"]: name for name, st in stages.items() for o in st.get("outs", [])}
    order, seen = [], set()

    def visit(name):
        if name in seen:
            return
        seen.add(name)
        for d in stages[name].get("deps", []):
            if d["path"] in produced:
                visit(produced[d["path"]])
        order.append(name)

    for name in stages:
        visit(name)
    return order


def sync_mtimes(root: Path = Path(".")) -> list[Path]:
    root = Path(root)
    lock = root / "dvc.lock"
    if not lock.is_file():
        return []
    stages = (safe_load(lock.read_text()) or {}).get("stages", {})
    order = _order(stages)
    if not any(_inverted(root, stages[name]) for name in order):
        return []
    trusted = _unchanged_stages(root, order)  # DVC itself vouches for these stages' files
    touched: list[Path] = []
    for name in order:  # DAG order: a stage is fixed after the stages it depends on
        st = stages[name]
        if name not in trusted or not _inverted(root, st):
            continue
        outs = [root / o["path"] for o in st.get("outs", [])]
        t = _newest_dep(root, st) + 1.0
        for p in outs:
            _touch_tree(p, t)
            touched.append(p)
    return touched


def _newest_dep(root: Path, stage: dict) -> float:
    """Newest mtime among the deps Snakemake compares (not the code: its rules fingerprint it)."""
    deps = [root / d["path"] for d in stage.get("deps", []) if d["path"] != CODE_DIR]
    return max((_mtime(p) for p in deps if p.exists()), default=0.0)


def _inverted(root: Path, stage: dict) -> bool:
    """All outputs present, but one looks no newer than a dependency."""
    outs = [root / o["path"] for o in stage.get("outs", [])]
    return bool(outs) and all(p.exists() for p in outs) and min(_mtime(p) for p in outs) <= _newest_dep(root, stage)


def _mtime(path: Path) -> float:
    """Newest mtime in a file or directory tree (what Snakemake compares)."""
    if path.is_dir():
        return max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")])
    return path.stat().st_mtime


def _touch_tree(path: Path, t: float) -> None:
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (t, t))
