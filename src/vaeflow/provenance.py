"""Code provenance: which code, commit and tool versions made a result.

One definition of "the code" serves both runners and every record:
every file of the vaeflow package except `IGNORED` (byte caches). Snakemake puts
`code_fingerprint()` in each rule's params; dvc.yaml lists `CODE_DIR` (the package's
source in the repo) as a dependency of each stage, and `.dvcignore` lists `IGNORED`,
so both hash the same files and an edit under src/vaeflow reruns the stages in
both, while an edit elsewhere (README.md, docs/) reruns nothing.

Torch-free at import time: the Snakefile imports it.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
# The package's source relative to the repo root: what dvc.yaml's stages depend on.
CODE_DIR = "src/vaeflow"
# Path components that are not code (matched with fnmatch); .dvcignore lists the same.
IGNORED = ("__pycache__", "*.pyc")
# Distributions whose versions every record names.
TOOLS = ("torch", "torchvision", "snakemake", "dvc", "vaeflow")
# Runner bookkeeping that changes while a pipeline runs; not a source edit.
NOT_SOURCE = ("dvc.lock",)


class ProvenanceError(ValueError):
    pass


def _ignored(rel: Path) -> bool:
    return any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in IGNORED)


def code_files(root: Path = PACKAGE_DIR) -> list[Path]:
    """The package's code files (relative to root), sorted."""
    root = Path(root)
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and not _ignored(p.relative_to(root)))


@functools.lru_cache(maxsize=8)
def code_fingerprint(root: Path = PACKAGE_DIR) -> str:
    """sha256 over the code files' paths and bytes (16 hex digits)."""
    h = hashlib.sha256()
    for rel in code_files(root):
        h.update(rel.as_posix().encode() + b"\0")
        h.update(hashlib.sha256((Path(root) / rel).read_bytes()).digest())
    return h.hexdigest()[:16]


def checkout_package(root: str | Path = ".") -> Path | None:
    """The vaeflow package of the checkout at root (<root>/src/vaeflow), or None when root is
    not a vaeflow checkout."""
    pkg = Path(root).resolve() / CODE_DIR
    return pkg if (pkg / "__init__.py").is_file() else None


def foreign_code(root: str | Path = ".") -> str | None:
    """None when the code that runs is the checkout's at root (or root is no checkout); else
    one line saying which code runs instead, and the fixes (docs/checkout.md).

    The running package is the checkout's when it is <root>/src/vaeflow, or another copy of
    the very same files (a non-editable install of this source): same code fingerprint. Any
    other tree would put its fingerprint into the rules' params and into every result's
    provenance, so an edit in this checkout would rerun nothing, and results would name code
    that is not the code here: refused, not warned (a warning scrolls by; the fix is one line)."""
    pkg = checkout_package(root)
    if pkg is None or pkg == PACKAGE_DIR or code_fingerprint(pkg) == code_fingerprint():
        return None
    return (f"the vaeflow that runs is {PACKAGE_DIR}, not this checkout's {pkg}, and their code differs: "
            "its code fingerprint would go into the rerun checks and every result's provenance, so an edit "
            "here would rerun nothing. Run the stage scripts (python scripts/<command>.py runs its own "
            "checkout's code), or `export PYTHONPATH=$PWD/src` in this shell, or `pip install --no-deps -e .` "
            "to make this checkout the environment's vaeflow")


def other_install_note(spec) -> str | None:
    """A note for the Snakefile, which puts its checkout's src/ first: the environment's vaeflow
    (`spec`, found before that) is another tree with other code, and is not what runs."""
    if spec is None or spec.origin is None:
        return None
    pkg = Path(spec.origin).resolve().parent
    if pkg == PACKAGE_DIR or code_fingerprint(pkg) == code_fingerprint():
        return None
    return (f"vaeflow: this checkout's code runs ({PACKAGE_DIR}), not the environment's vaeflow ({pkg}), "
            "whose code differs (docs/checkout.md)")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def git_state(cwd: str | Path = ".") -> dict[str, Any]:
    """HEAD of the repo at cwd and whether tracked files differ from it (None: not a git repo).

    Untracked files and runner bookkeeping (dvc.lock) don't make a tree dirty."""
    cwd = Path(cwd)
    commit = _git(["rev-parse", "--verify", "-q", "HEAD"], cwd)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd) or ""
    changed = [line[3:] for line in status.splitlines() if line[3:] not in NOT_SOURCE]
    return {"commit": commit.strip(), "dirty": bool(changed)}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.lru_cache(maxsize=4)
def _record(cwd: str) -> str:
    return json.dumps({"code_fingerprint": code_fingerprint(), "git": git_state(cwd), "versions": versions()})


def record(cwd: str | Path = ".") -> dict[str, Any]:
    """What checkpoints and metrics.json store under "provenance" (computed once per process).

    No times, hosts or absolute paths: two clones of one commit record the same bytes."""
    return json.loads(_record(str(Path(cwd).resolve())))


def read(path: str | Path) -> dict[str, Any]:
    """The provenance record of a checkpoint (.pt) or a metrics.json."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProvenanceError(f"{path}: file not found") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProvenanceError(f"{path}: not valid JSON ({exc})") from None
    elif path.suffix in (".pt", ".pth", ".ckpt"):
        from vaeflow.checkpoint import load

        obj = load(path)
    else:
        raise ProvenanceError(f"{path}: expected a checkpoint (.pt) or an eval metrics.json")
    rec = obj.get("provenance") if isinstance(obj, dict) else None
    if not isinstance(rec, dict):
        raise ProvenanceError(f"{path}: no provenance recorded (written before vaeflow recorded it?)")
    return rec



def describe(rec: dict[str, Any]) -> str:
    """Human-readable lines for `vaeflow provenance`."""
    git = rec.get("git") or {}
    if git.get("commit") is None:
        commit = "unknown (not run inside a git repository with a commit)"
    else:
        commit = f"{git['commit']} ({'dirty: tracked files differed from it' if git.get('dirty') else 'clean'})"
    vers = rec.get("versions") or {}
    init = rec.get("init")
    return "\n".join([
        f"git commit:       {commit}",
        f"code fingerprint: {rec.get('code_fingerprint')} (vaeflow package source)",
        "versions:         " + ", ".join(f"{k} {v or 'not installed'}" for k, v in vers.items()),
    ] + ([f"started from:     {init.get('source')} ({init.get('kind')}, {init.get('file')} sha256 {init.get('sha256')})"]
         if init else []))
