"""Raw data -> prepared arrays: deterministic split, atomic write, manifest.

Layout written to ``out_dir`` (see CONTRIBUTING.md, "Prepared data")::

    train.npy, val.npy, test.npy   uint8 or uint16, [N, C, H, W] (or [N, C, D, H, W])
    manifest.json                  written last; a directory without it is never complete

Everything is first written to a temp dir next to ``out_dir`` (same filesystem),
fsynced, and then renamed into place; an existing prepared dir is only replaced
once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from vaeflow.checkpoint import fsync_path
from vaeflow.layout import DATA_FILES, MANIFEST, SPLITS, split_file

from .errors import DataError
from .sources import get_source
from .splitcheck import check_split_counts
from .sources.base import Record

MANIFEST_FORMAT = "vaeflow.prepared/1"
PREPARED_FILES = set(DATA_FILES)
MAX_LISTED_SKIPS = 1000

def resolve_data_cfg(data_cfg: dict | None) -> dict:
    """The ``data:`` section checked against the schema, with its defaults and the values
    that depend on the dataset (channels, dtype, binarize_seed) filled in."""
    from vaeflow.config import ConfigError, validate_section

    cfg = dict(data_cfg or {})
    if isinstance(cfg.get("root"), os.PathLike):
        cfg["root"] = os.fspath(cfg["root"])
    try:
        cfg = validate_section("data", cfg)
    except ConfigError as exc:
        raise DataError(str(exc)) from None
    if cfg["channels"] is None:
        cfg["channels"] = get_source(cfg["dataset"]).default_channels
    if cfg["binarize_seed"] is None:
        cfg["binarize_seed"] = cfg["split_seed"]
    if cfg["dtype"] == "auto":
        cfg["dtype"] = "uint16" if cfg["dataset"] == "ct" else "uint8"
    cfg["ct"]["hu_window"] = [float(v) for v in cfg["ct"]["hu_window"]]
    return cfg


# -- splitting ---------------------------------------------------------------

def split_sizes(n: int, val: float, test: float, has_fixed_test: bool) -> tuple[int, int]:
    """Groups given to val and test out of n (the rest train): round(fraction * n), keeping
    at least one training group."""
    n_test = 0 if has_fixed_test else int(round(test * n))
    n_val = int(round(val * n))
    if n_val + n_test >= n:  # keep at least one training group
        n_val = max(0, min(n_val, n - n_test - 1))
        n_test = max(0, min(n_test, n - n_val - 1))
    return n_val, n_test


def kept_counts_at(records: list[Record], kept: dict[str, int], seed: int):
    """A function (val, test) -> items per split that split_records would give these records
    with those fractions, counting only the kept (not skipped) items: kept[group] items of each
    pooled group, kept["\0fixed:<split>"] of the fixed ones. The empty-split refusal uses it to
    give a hint that works after skipping."""
    pool_groups: dict[str, int] = {}
    for r in records:
        if not r.fixed_split:
            pool_groups.setdefault(r.group, len(pool_groups))
    n = len(pool_groups)
    has_fixed_test = any(r.fixed_split == "test" for r in records)
    perm = np.random.default_rng(seed).permutation(n)
    per_group = np.zeros(n, dtype=np.int64)
    for g, i in pool_groups.items():
        per_group[i] = kept.get(g, 0)
    cum = np.concatenate([[0], np.cumsum(per_group[perm])])  # kept items of the first k groups
    fixed = {s: kept.get(f"\0fixed:{s}", 0) for s in SPLITS}

    def counts(val: float, test: float) -> dict[str, int]:
        n_val, n_test = split_sizes(n, val, test, has_fixed_test)
        return {"test": fixed["test"] + int(cum[n_test]),
                "val": fixed["val"] + int(cum[n_test + n_val] - cum[n_test]),
                "train": fixed["train"] + int(cum[n] - cum[n_test + n_val])}

    counts.usable_groups = int((per_group > 0).sum())
    return counts


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
    n_val, n_test = split_sizes(n, val, test, has_fixed_test)
    perm = np.random.default_rng(seed).permutation(n)
    where = np.empty(n, dtype=np.int8)
    where[perm[:n_test]] = 2
    where[perm[n_test:n_test + n_val]] = 1
    where[perm[n_test + n_val:]] = 0
    for r in pool:
        out[SPLITS[where[groups[r.group]]]].append(r)
    return out


# -- writing -----------------------------------------------------------------

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
        fsync_path(self.path)
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
        kept: dict[str, int] = {}  # kept items per group (kept_counts_at)
        item_shape: tuple | None = None
        first_key = None
        writers: dict[str, _SplitWriter] = {}
        groups: dict[str, int] = {}
        for split in SPLITS:
            recs = splits[split]
            writer = writers[split] = _SplitWriter(tmp / split_file(split), len(recs), dtype)
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
                gkey = f"\0fixed:{rec.fixed_split}" if rec.fixed_split else rec.group
                kept[gkey] = kept.get(gkey, 0) + 1
            groups[split] = len(kept_groups)
        if item_shape is None:
            raise DataError(f"dataset '{cfg['dataset']}': every item was bad ({n_skipped} skipped); nothing to prepare")
        shapes = {split: writers[split].close(item_shape) for split in SPLITS}
        counts = {split: shapes[split][0] for split in SPLITS}
        check_split_counts(counts, n_groups, cfg, skipped=n_skipped,
                           counts_at=kept_counts_at(records, kept, cfg["split_seed"]))

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
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        fsync_path(tmp)
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
    fsync_path(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fmt_shape(shape: tuple) -> str:
    return "x".join(str(s) for s in shape[1:])


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
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
        raise DataError(f"{Path(root) / MANIFEST} was prepared from another data: section ({shown}); run prepare again")
    return manifest
