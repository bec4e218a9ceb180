"""Checkpoint files: written atomically, read with weights_only=True.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (see
CONTRIBUTING.md for its keys), so the safe unpickler can load it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily (torch-free jobs use atomic_write)
    import torch

FORMAT = "vaeflow-checkpoint/1"


class CheckpointError(ValueError):
    pass


def atomic_write(path: str | Path, write) -> None:
    """Call write(fileobj) on a temp file beside path, fsync, then rename over path.

    A reader sees either the old file or the complete new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder by path (a folder: so a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_link(src: str | Path, path: str | Path) -> None:
    """Make path a hard link of the complete file src, replacing path atomically. The temp
    name is fixed (one writer per file), so a link left by a kill is replaced next time."""
    src, path = Path(src), Path(path)
    tmp = path.parent / f".{path.name}.link"
    tmp.unlink(missing_ok=True)
    os.link(src, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def save(obj: dict[str, Any], path: str | Path, also: tuple[str | Path, ...] = ()) -> None:
    """Write obj to path atomically; each of `also` becomes a hard link of it (the same bytes
    without serializing again: ~30 ms for the default model's 650 tensors)."""
    import torch  # here, not at the top: atomic_write serves torch-free jobs (curves, summary)

    atomic_write(path, lambda f: torch.save(obj, f))
    for other in also:
        atomic_link(path, other)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    import torch

    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or unsafe content
        first = (str(exc).strip().splitlines() or [""])[0]  # torch's messages run to many lines
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(exc).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(obj).__name__}")
    return obj


def load_vaeflow(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by the trainer, checking its format tag."""
    obj = load(path, map_location)
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a vaeflow checkpoint (format {obj.get('format')!r}, expected {FORMAT!r})")
    return obj


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
