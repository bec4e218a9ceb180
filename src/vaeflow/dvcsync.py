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

import yaml


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
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    inverted = []
    for name in _order(stages):
        st = stages[name]
        outs = [root / o["path"] for o in st.get("outs", [])]
        deps = [root / d["path"] for d in st.get("deps", [])]
        if outs and all(p.exists() for p in outs) and min(_mtime(p) for p in outs) <= max(
            (_mtime(p) for p in deps if p.exists()), default=0.0
        ):
            inverted.append(name)
    if not inverted:
        return []
    # DVC itself vouches for these files. Every stage is a candidate, not only the inverted
    # ones: fixing a stage's outputs can invert a downstream stage that looked fine before
    # (e.g. summary after evaluate). One `dvc status` call answers for all of them.
    trusted = _unchanged_stages(root, list(stages))
    touched: list[Path] = []
    for name in _order(stages):  # DAG order, so each stage's deps are already fixed
        if name not in trusted:
            continue
        st = stages[name]
        outs = [root / o["path"] for o in st.get("outs", [])]
        if not outs or not all(p.exists() for p in outs):
            continue
        newest_dep = max((_mtime(root / d["path"]) for d in st.get("deps", []) if (root / d["path"]).exists()), default=0.0)
        if min(_mtime(p) for p in outs) > newest_dep:
            continue  # already newer than every dep (with the deps as fixed so far)
        t = max(newest_dep, max(_mtime(p) for p in outs)) + 1.0
        for p in outs:
            _touch_tree(p, t)
            touched.append(p)
    return touched


def _mtime(path: Path) -> float:
    """Newest mtime in a file or directory tree (what Snakemake compares)."""
    if path.is_dir():
        return max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")])
    return path.stat().st_mtime


def _touch_tree(path: Path, t: float) -> None:
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (t, t))
