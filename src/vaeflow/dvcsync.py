"""Make Snakemake trust outputs that `dvc pull` / `dvc checkout` restored.

DVC does not keep modification times, so after a pull an output can look older than
its inputs and Snakemake would rerun it. For each stage in dvc.lock whose file deps
and outs all match the hashes DVC recorded, this sets the outs' mtimes after their
deps', in DAG order. Files that do not match the lock are left alone, so a real
change still triggers a rerun. Cheap when nothing is out of order: hashes are only
computed for stages whose mtimes are inverted.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import yaml


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _matches(root: Path, entry: dict) -> bool:
    path = root / entry["path"]
    if "md5" not in entry or str(entry["md5"]).endswith(".dir"):
        return True  # directories / non-md5 entries: nothing cheap to verify, not ours to judge
    return path.is_file() and path.stat().st_size == entry.get("size", path.stat().st_size) and _md5(path) == entry["md5"]


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
    touched: list[Path] = []
    for name in _order(stages):
        st = stages[name]
        outs = [root / o["path"] for o in st.get("outs", [])]
        deps = [root / d["path"] for d in st.get("deps", [])]
        if not outs or not all(p.is_file() for p in outs):
            continue
        newest_dep = max((p.stat().st_mtime for p in deps if p.exists()), default=0.0)
        if min(p.stat().st_mtime for p in outs) > newest_dep:
            continue
        if not all(_matches(root, e) for e in st.get("deps", []) + st.get("outs", [])):
            continue
        t = newest_dep + 1.0
        for p in outs:
            os.utime(p, (t, t))
            touched.append(p)
    return touched
