"""The Snakefile's code-level config check (`config.check_code_level`), remembered between runs.

That check builds the model, so it imports torch: seconds that every `snakemake -n` would pay
again on an unchanged config. The Snakefile calls `check_code_level_cached`, which runs the
check once per (config, vaeflow source, torch version, LPIPS environment) and records a pass
as an empty stamp file under `.snakemake/vaeflow/`; any change to one of those runs it again.
A stage that uses LPIPS is checked every time (its weights file may come or go). Stage
commands and `vaeflow validate` always run the full check.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

from vaeflow import config as vfconfig

STAMP_DIR = Path(".snakemake") / "vaeflow"
_PACKAGE = Path(__file__).resolve().parent


def _source_state() -> list:
    """(path, size, mtime) of every file of the vaeflow package: an edit changes the key."""
    files = sorted(p for p in _PACKAGE.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts)
    return [(str(p.relative_to(_PACKAGE)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _key(config: dict) -> str:
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    state = {
        "config": config,
        "source": _source_state(),
        "torch": torch_version,
        "env": {k: os.environ.get(k) for k in ("VAEFLOW_LPIPS_RANDOM_BACKBONE", "TORCH_HOME")},
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:32]


def check_code_level_cached(config: dict, stamp_dir: str | Path = STAMP_DIR) -> bool:
    """Run `check_code_level` unless this exact check passed before. Returns True when it ran."""
    if any(step["use_lpips"] for step in vfconfig.resolve_steps(config)):
        vfconfig.check_code_level(config)
        return True
    stamp_dir = Path(stamp_dir)
    stamp = stamp_dir / f"code-check-{_key(config)}"
    if stamp.exists():
        return False
    vfconfig.check_code_level(config)  # raises ConfigError: no stamp
    try:
        stamp_dir.mkdir(parents=True, exist_ok=True)
        for old in stamp_dir.glob("code-check-*"):
            old.unlink(missing_ok=True)
        stamp.touch()
    except OSError:  # a read-only working directory only loses the shortcut
        pass
    return True
