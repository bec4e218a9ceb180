"""Raw data -> prepared arrays: config defaults, deterministic split, atomic write, manifest.

Layout written to ``out_dir`` (see CONTRIBUTING.md, "Prepared data")::

    train.npy, val.npy, test.npy   uint8 or uint16, [N, C, H, W] (or [N, C, D, H, W])
    manifest.json                  written last; a directory without it is never complete

Everything is first written to a temp dir next to ``out_dir`` (same filesystem),
fsynced, and then renamed into place; an existing prepared dir is only replaced
once the new one is complete.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import DataError
from .sources import SOURCES, get_source
from .splitcheck import check_split_counts
from .sources.base import Record

MANIFEST_FORMAT = "vaeflow.prepared/1"
SPLITS = ("train", "val", "test")
PREPARED_FILES = {f"{s}.npy" for s in SPLITS} | {"manifest.json"}
MAX_LISTED_SKIPS = 1000

DEFAULTS: dict = {
    "dataset": "digits",
    "root": None,
    "image_size": None,  # None: the dataset's native size
    "channels": None,  # None: 1 for digits/mnist/ct, 3 for celeba/image_dir
    "split": {"val": 0.1, "test": 0.1, "official": True},
    "split_seed": 0,
    "limit": None,
    "skip_bad": False,
    "binarize": "none",
    "binarize_threshold": None,
    "binarize_seed": None,  # None: split_seed
    "dtype": "auto",  # auto: uint16 for ct, uint8 otherwise
    "spatial_dims": 2,
    "download": True,
    "ct": {"format": "dicom", "hu_window": [-1000, 1000], "volume_depth": 16, "npy_values": "hu",
           "group_by": "series"},
}


def _merge(defaults: dict, given: dict) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in (given or {}).items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_data_cfg(data_cfg: dict | None) -> dict:
    """Fill defaults into a ``data:`` config section and check values (DataError on nonsense)."""
    cfg = _merge(DEFAULTS, dict(data_cfg or {}))
    name = cfg["dataset"]
    if isinstance(cfg["root"], os.PathLike):
        cfg["root"] = os.fspath(cfg["root"])
    if name not in SOURCES:
        raise DataError(f"data.dataset '{name}' is unknown; choose one of {', '.join(SOURCES)}")
    if cfg["channels"] is None:
        cfg["channels"] = get_source(name).default_channels
    if cfg["channels"] not in (1, 3):
        raise DataError(f"data.channels must be 1 or 3, got {cfg['channels']!r}")
    size = cfg["image_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise DataError(f"data.image_size must be a positive integer or null, got {size!r}")
    split = cfg["split"]
    for key in ("val", "test"):
        v = split.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise DataError(f"data.split.{key} must be a fraction in [0, 1), got {v!r}")
    if split["val"] + split["test"] >= 1:
        raise DataError(f"data.split.val + data.split.test must be < 1, got {split['val']} + {split['test']}")
    if isinstance(cfg["split_seed"], bool) or not isinstance(cfg["split_seed"], int):
        raise DataError(f"data.split_seed must be an integer, got {cfg['split_seed']!r}")
    limit = cfg["limit"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"data.limit must be a positive integer or null, got {limit!r}")
    if cfg["binarize"] in (None, False):
        cfg["binarize"] = "none"
    if cfg["binarize"] not in ("none", "static", "dynamic"):
        raise DataError(f"data.binarize must be none, static or dynamic, got {cfg['binarize']!r}")
    thr = cfg["binarize_threshold"]
    if thr is not None and (isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 <= thr <= 1):
        raise DataError(f"data.binarize_threshold must be in [0, 1] or null, got {thr!r}")
    if cfg["binarize_seed"] is None:
        cfg["binarize_seed"] = cfg["split_seed"]
    if cfg["dtype"] == "auto":
        cfg["dtype"] = "uint16" if name == "ct" else "uint8"
    if cfg["dtype"] not in ("uint8", "uint16"):
        raise DataError(f"data.dtype must be auto, uint8 or uint16, got {cfg['dtype']!r}")
    if cfg["spatial_dims"] not in (2, 3):
        raise DataError(f"data.spatial_dims must be 2 or 3, got {cfg['spatial_dims']!r}")
    if cfg["spatial_dims"] == 3 and name != "ct":
        raise DataError(f"data.spatial_dims: 3 needs data.dataset: ct (volumes), not '{name}'")
    ct = cfg["ct"]
    if ct["format"] not in ("dicom", "npy"):
        raise DataError(f"data.ct.format must be dicom or npy, got {ct['format']!r}")
    win = ct["hu_window"]
    if not (isinstance(win, (list, tuple)) and len(win) == 2 and all(isinstance(v, (int, float)) for v in win)
            and win[0] < win[1]):
        raise DataError(f"data.ct.hu_window must be [low, high] with low < high, got {win!r}")
    ct["hu_window"] = [float(win[0]), float(win[1])]
    depth = ct["volume_depth"]
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise DataError(f"data.ct.volume_depth must be a positive integer, got {depth!r}")
    if ct["group_by"] not in ("series", "patient"):
        raise DataError(f"data.ct.group_by must be series or patient, got {ct['group_by']!r}")
    if ct["npy_values"] not in ("hu", "unit"):
        raise DataError(f"data.ct.npy_values must be hu or unit, got {ct['npy_values']!r}")
    return cfg


# -- splitting ---------------------------------------------------------------

def split_records(records: list[Record], val: float, test: float, seed: int) -> dict[str, list[Record]]:
    """Deterministic group-wise split: a seeded permutation of the groups (in
    first-seen order) gives the first ``round(test*G)`` groups to test, the next
    ``round(val*G)`` to val, the rest to train. Records with ``fixed_split``
    (official test sets) keep it; the fractions then apply to the remaining pool.
    Within a split, records keep their source order."""
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    fixed = [r for r in records if r.fixed_split]
    pool = [r for r in records if not r.fixed_split]
    for r in fixed:
        out[r.fixed_split].append(r)
    groups: dict[str, int] = {}
    for r in pool:
        groups.setdefault(r.group, len(groups))
    n = len(groups)
    has_fixed_test = any(r.fixed_split == "test" for r in fixed)
    n_test = 0 if has_fixed_test else int(round(test * n))
    n_val = int(round(val * n))
    if n_val + n_test >= n:  # keep at least one training group
        n_val = max(0, min(n_val, n - n_test - 1))
        n_test = max(0, min(n_test, n - n_val - 1))
    perm = np.random.default_rng(seed).permutation(n)
    where = np.empty(n, dtype=np.int8)
    where[perm[:n_test]] = 2
    where[perm[n_test:n_test + n_val]] = 1
    where[perm[n_test + n_val:]] = 0
    for r in pool:
        out[SPLITS[where[groups[r.group]]]].append(r)
    return out


# -- writing -----------------------------------------------------------------

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"prepared-data target {out_dir} exists and is not a directory")
    if out_dir.is_dir():
        # .gitignore: DVC writes one beside the outputs it tracks
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in PREPARED_FILES and p.name != ".gitignore")
        if foreign:
            raise DataError(
                f"prepared-data target {out_dir} holds files that are not prepared data "
                f"({', '.join(foreign[:5])}); refusing to replace it")


def _quantize(x: np.ndarray, dtype: np.dtype, scale: int) -> np.ndarray:
    return np.clip(np.rint(x * scale), 0, scale).astype(dtype)


class _SplitWriter:
    """Writes one split's rows into a .npy memmap, shrinking it if items were skipped."""

    def __init__(self, path: Path, n: int, dtype: np.dtype):
        self.path, self.n, self.dtype = path, n, dtype
        self.arr = None
        self.count = 0

    def add(self, item: np.ndarray) -> None:
        if self.arr is None:
            self.arr = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=(self.n,) + item.shape)
        self.arr[self.count] = item
        self.count += 1

    def close(self, item_shape: tuple) -> tuple:
        if self.arr is None:
            np.save(self.path, np.zeros((0,) + tuple(item_shape), dtype=self.dtype))
        else:
            self.arr.flush()
            if self.count < self.n:
                tmp = self.path.with_suffix(".part.npy")
                small = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype,
                                                  shape=(self.count,) + self.arr.shape[1:])
                small[:] = self.arr[: self.count]
                small.flush()
                del small
                self.arr = None
                os.replace(tmp, self.path)
            self.arr = None
        _fsync_path(self.path)
        return (self.count,) + tuple(item_shape)


def prepare_dataset(data_cfg: dict, out_dir: str | Path) -> dict:
    """Convert the raw data named by ``data_cfg`` into the prepared form in ``out_dir``.

    Returns the manifest (also written to ``out_dir/manifest.json``). Raises
    :class:`DataError` with the offending file named for any bad input, unless
    ``skip_bad`` is set, in which case bad items are skipped and listed in the manifest.
    """
    cfg = resolve_data_cfg(data_cfg)
    out_dir = Path(out_dir)
    _check_target(out_dir)

    source = get_source(cfg["dataset"])(cfg)
    records = source.records()
    if cfg["limit"] is not None and not getattr(source, "handles_limit", False):
        records = records[: cfg["limit"]]
    if not records:
        raise DataError(f"dataset '{cfg['dataset']}': no items to prepare")
    splits = split_records(records, cfg["split"]["val"], cfg["split"]["test"], cfg["split_seed"])
    n_groups = len({r.group for r in records})  # an empty split is refused before the swap-in

    dtype = np.dtype(cfg["dtype"])
    scale = int(np.iinfo(dtype).max)
    binarize_static = cfg["binarize"] == "static"
    bin_rng = np.random.default_rng(cfg["binarize_seed"])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        skipped: list[dict] = []
        n_skipped = 0
        item_shape: tuple | None = None
        first_key = None
        writers: dict[str, _SplitWriter] = {}
        groups: dict[str, int] = {}
        for split in SPLITS:
            recs = splits[split]
            writer = writers[split] = _SplitWriter(tmp / f"{split}.npy", len(recs), dtype)
            kept_groups = set()
            for rec, item in source.iter_items(recs):
                if not isinstance(item, DataError) and item_shape is not None and item.shape != item_shape:
                    item = DataError(
                        f"{rec.key}: size {_fmt_shape(item.shape)} differs from {_fmt_shape(item_shape)} of the first "
                        f"item, {first_key}; mixed sizes need data.image_size to resize them")
                if isinstance(item, DataError):
                    if not cfg["skip_bad"]:
                        raise item
                    n_skipped += 1
                    if len(skipped) < MAX_LISTED_SKIPS:
                        skipped.append({"file": rec.key, "reason": str(item)})
                    continue
                if item_shape is None:
                    item_shape, first_key = item.shape, rec.key
                if binarize_static:
                    if cfg["binarize_threshold"] is not None:
                        item = (item >= cfg["binarize_threshold"]).astype(np.float32)
                    else:
                        item = (bin_rng.random(item.shape, dtype=np.float32) < item).astype(np.float32)
                writer.add(_quantize(item, dtype, scale))
                kept_groups.add(rec.group)
            groups[split] = len(kept_groups)
        if item_shape is None:
            raise DataError(f"dataset '{cfg['dataset']}': every item was bad ({n_skipped} skipped); nothing to prepare")
        shapes = {split: writers[split].close(item_shape) for split in SPLITS}
        counts = {split: shapes[split][0] for split in SPLITS}
        check_split_counts(counts, n_groups, cfg, skipped=n_skipped)

        manifest = {
            "format": MANIFEST_FORMAT,
            "dataset": cfg["dataset"],
            "dtype": cfg["dtype"],
            "scale": scale,
            "item_shape": list(item_shape),
            "layout": "NCDHW" if len(item_shape) == 4 else "NCHW",
            "spatial_dims": len(item_shape) - 1,
            "shapes": {s: list(shapes[s]) for s in SPLITS},
            "counts": {s: counts[s] for s in SPLITS},
            "groups": {s: groups[s] for s in SPLITS},
            "split": {"val": cfg["split"]["val"], "test": cfg["split"]["test"], "seed": cfg["split_seed"],
                      "method": "seeded permutation of groups (numpy default_rng)"},
            "binarize": cfg["binarize"],
            "source": source.source_info(),
            "skipped": {"count": n_skipped, "files": skipped},
            "config": cfg,
        }
        if hasattr(source, "manifest_extra"):
            manifest.update(source.manifest_extra())
        with open(tmp / "manifest.json", "w") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_path(tmp)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temp dir onto out_dir; an old dir is moved aside first
    and deleted only after the new one is in place."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    _fsync_path(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fmt_shape(shape: tuple) -> str:
    return "x".join(str(s) for s in shape[1:])


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{root} is not a prepared dataset (no manifest.json); run the prepare stage first")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from None


def check_prepared(data_cfg: dict, root: str | Path) -> dict:
    """The manifest of `root`, after checking it was prepared from this `data:` section.

    Guards training and evaluation against stale prepared data (e.g. a runner reusing
    results/data made for another config when the raw data is missing).
    """
    manifest = load_manifest(root)
    wanted = resolve_data_cfg(data_cfg)
    have = manifest.get("config", {})
    diff = sorted(k for k in set(wanted) | set(have) if wanted.get(k) != have.get(k))
    if diff:
        shown = ", ".join(f"{k}: {have.get(k)!r} (config wants {wanted.get(k)!r})" for k in diff[:3])
        raise DataError(f"{Path(root) / 'manifest.json'} was prepared from another data: section ({shown}); run prepare again")
    return manifest
