"""Shared pieces for raw-data sources: the record type, the source base class,
array helpers (resize, channel conversion) and file checksums."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class Record:
    """One item to prepare.

    key:   human-readable name used in messages and the manifest (a path
           relative to data.root, or e.g. ``digits[12]``).
    group: items sharing a group always land in the same split (CT slices of
           one series, for instance), so nothing leaks between train and test.
    ref:   whatever the source needs to load the item.
    fixed_split: an official split the item belongs to (MNIST's t10k files).
    """

    key: str
    group: str
    ref: Any = None
    fixed_split: str | None = None


class Source:
    """A raw-data source.

    Subclasses implement :meth:`records` (cheap: list what there is, raise
    :class:`DataError` for a missing root or an empty folder) and either
    :meth:`load` (one record -> float32 array in [0, 1], ``[C, H, W]`` or
    ``[C, D, H, W]``, already at the configured size and channel count) or
    :meth:`iter_items` for vectorised sources.
    """

    name = ""
    default_channels = 1

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.channels: int = cfg["channels"]
        self.image_size: int | None = cfg["image_size"]
        # relative file name -> sha256, filled in as files are read.
        self.digests: dict[str, str] = {}
        self.ignored: list[str] = []

    # -- to implement -----------------------------------------------------
    def records(self) -> list[Record]:
        raise NotImplementedError

    def load(self, record: Record) -> np.ndarray:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------
    def iter_items(self, records: Iterable[Record]) -> Iterator[tuple[Record, np.ndarray | DataError]]:
        """Yield ``(record, array)`` or ``(record, DataError)``; never raises for one bad item."""
        for rec in records:
            try:
                yield rec, self.load(rec)
            except DataError as exc:
                yield rec, exc
            except Exception as exc:  # noqa: BLE001 - any decoder failure must name the file
                yield rec, DataError(f"{rec.key}: cannot read ({type(exc).__name__}: {exc})")

    def source_info(self) -> dict:
        """Checksums of the source files actually read (for the manifest)."""
        combined = hashlib.sha256()
        for name in sorted(self.digests):
            combined.update(f"{name}\0{self.digests[name]}\n".encode())
        info: dict = {"n_files": len(self.digests), "sha256": combined.hexdigest()}
        if len(self.digests) <= 100:
            info["files"] = dict(sorted(self.digests.items()))
        if self.ignored:
            info["ignored_files"] = len(self.ignored)
            info["ignored_examples"] = sorted(self.ignored)[:10]
        return info

    def read_bytes(self, path: Path, key: str) -> bytes:
        """Read a whole file and remember its checksum."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise DataError(f"{key}: cannot read file ({exc.strerror or exc})") from None
        self.digests[key] = hashlib.sha256(data).hexdigest()
        return data


# -- helpers ---------------------------------------------------------------

def require_root(cfg: dict, dataset: str) -> Path:
    root = cfg.get("root")
    if root in (None, ""):
        raise DataError(f"data.root is required for dataset '{dataset}' (set data.root to the folder with the raw data)")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data.root {path} does not exist (dataset '{dataset}'); see docs/data.md for what to put there")
    if not path.is_dir():
        raise DataError(f"data.root {path} is not a directory (dataset '{dataset}')")
    return path


def walk_files(root: Path) -> list[Path]:
    """All regular files under root, recursively, sorted, skipping hidden files/dirs
    (``.DS_Store``, macOS ``._x.jpg`` resource forks, ``.dvc`` folders)."""
    out: list[Path] = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_file():
            out.append(path)
    out.sort(key=lambda p: p.relative_to(root).as_posix())
    return out


def to_channels(x: np.ndarray, channels: int, key: str) -> np.ndarray:
    """[C, ...] float array -> [channels, ...]: replicate gray, or ITU-R 601 luma for RGB->gray."""
    c = x.shape[0]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return np.repeat(x, 3, axis=0)
    if c == 3 and channels == 1:
        w = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape((3,) + (1,) * (x.ndim - 1))
        return (x * w).sum(axis=0, keepdims=True)
    raise DataError(f"{key}: cannot convert {c} channels to {channels}")


def _aa_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of antialiased bilinear resampling: a triangle filter widened by the
    downscale factor, renormalised at the borders; the weights of
    `torch.nn.functional.interpolate(mode="bilinear", antialias=True, align_corners=False)`
    (and PIL's BILINEAR), computed in float64."""
    scale = in_size / out_size
    support = max(scale, 1.0)  # the filter's half-width in input pixels
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        taps = np.clip(1.0 - np.abs((np.arange(lo, hi) - center + 0.5) * invscale), 0.0, None)
        if taps.sum() > 0:
            w[i, lo:hi] = taps / taps.sum()
    return w


def resize_square(x: np.ndarray, size: int | None) -> np.ndarray:
    """Resize float images so the shorter side is ``size`` (bilinear, antialiased),
    then center-crop to ``size x size``. ``x``: [C, H, W] or [N, C, H, W].
    ``size=None`` keeps the native size. NumPy, not torch: `prepare` needs no torch import
    (2 s at the head of the pipeline); tests/data/test_resize.py holds it to torch's
    `interpolate(antialias=True)`."""
    if size is None:
        return x
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    if h != w:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    else:
        nh = nw = size
    t = np.asarray(x, dtype=np.float32)
    if (nh, nw) != (h, w):  # rows, then columns (float32, as torch computes it)
        t = np.matmul(_aa_weights(h, nh).astype(np.float32), t)
        t = np.matmul(t, _aa_weights(w, nw).T.astype(np.float32))
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.clip(t[..., top:top + size, left:left + size], 0.0, 1.0).astype(np.float32)


def center_crop(x: np.ndarray, size: int) -> np.ndarray:
    """torchvision-style CenterCrop on [..., H, W] (pads with zeros if smaller)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        pad = [(0, 0)] * (x.ndim - 2) + [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)]
        x = np.pad(x, pad)
        h, w = x.shape[-2:]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]
