"""``celeba``: aligned CelebA faces (center crop, then resize).

Images come from ``data.root/img_align_celeba/`` when that folder exists,
otherwise from ``data.root`` itself (recursive). Transform: CenterCrop(178),
then resize to ``data.image_size`` (bilinear, antialiased), RGB by default.

Splits, in order of preference:

1. ``list_eval_partition.txt`` (in ``data.root``, ``data.root/Eval`` or the image
   folder; ``data.split.official: true``): the official partition that published
   CelebA numbers use (0 train, 1 val, 2 test). Every image must be listed;
2. ``identity_CelebA.txt``: a seeded split by identity (``data.split`` fractions of
   identities), so no person is in two splits;
3. neither: a seeded split per image. The same person can then appear in train and
   test (not identity-disjoint), and numbers are not comparable with published ones.

The manifest records which one was used (``celeba_split``), and with both files
present how many identities the official partition puts in more than one split.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import Record, center_crop, resize_square
from .image_dir import ImageDirSource

CROP = 178
PARTITION_FILE = "list_eval_partition.txt"
IDENTITY_FILE = "identity_CelebA.txt"
PARTITION_SPLITS = {"0": "train", "1": "val", "2": "test"}


class CelebASource(ImageDirSource):
    name = "celeba"
    default_channels = 3
    handles_limit = True

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.data_root = self.root
        sub = self.root / "img_align_celeba"
        if sub.is_dir():
            self.root = sub
        self.split_info: dict = {}

    def transform(self, x: np.ndarray) -> np.ndarray:
        return resize_square(center_crop(x, CROP), self.image_size)

    def _find(self, name: str) -> Path | None:
        for d in (self.data_root, self.data_root / "Eval", self.data_root / "Anno", self.root):
            if (d / name).is_file():
                return d / name
        return None

    def _table(self, path: Path) -> dict[str, str]:
        """`<image> <value>` lines -> {image: value}; DataError naming the file and line."""
        key = path.relative_to(self.data_root).as_posix() if path.is_relative_to(self.data_root) else path.name
        out = {}
        for n, line in enumerate(self.read_bytes(path, key).decode("utf-8", "replace").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise DataError(f"{path}:{n}: expected '<image> <value>', got {line.strip()!r}")
            out[parts[0]] = parts[1]
        return out

    def records(self) -> list[Record]:
        recs = super().records()
        partition = self._find(PARTITION_FILE) if self.cfg["split"].get("official", True) else None
        identity_path = self._find(IDENTITY_FILE)
        identity = self._table(identity_path) if identity_path else {}
        if partition is not None:
            recs = self._official(recs, partition, identity)
        elif identity:
            recs = [Record(r.key, f"id{identity.get(Path(r.key).name, r.key)}", r.ref) for r in recs]
            self.split_info = {"method": f"seeded split by identity ({identity_path.name}): identity-disjoint"}
        else:
            self.split_info = {"method": "seeded split per image: NOT identity-disjoint (no "
                                         f"{PARTITION_FILE} or {IDENTITY_FILE} found)"}
        return self._limit(recs)

    def _official(self, recs: list[Record], partition: Path, identity: dict) -> list[Record]:
        table = self._table(partition)
        bad = sorted({v for v in table.values()} - set(PARTITION_SPLITS))
        if bad:
            raise DataError(f"{partition}: split values must be 0, 1 or 2, found {bad[:3]}")
        missing = [r.key for r in recs if Path(r.key).name not in table]
        if missing:
            raise DataError(f"{missing[0]}: not listed in {partition} ({len(missing)} images are not); "
                            f"remove them or set data.split.official: false")
        out = [Record(r.key, r.group, r.ref, PARTITION_SPLITS[table[Path(r.key).name]]) for r in recs]
        self.split_info = {"method": f"official {PARTITION_FILE}", "listed": len(table), "used": len(out)}
        if identity:
            splits = defaultdict(set)
            for r in out:
                splits[identity.get(Path(r.key).name)].add(r.fixed_split)
            self.split_info["identities_in_several_splits"] = sum(len(s) > 1 for k, s in splits.items() if k)
        return out

    def _limit(self, recs: list[Record]) -> list[Record]:
        """data.limit: the first N images, taken from each official split in proportion."""
        limit = self.cfg["limit"]
        if limit is None or limit >= len(recs):
            return recs
        if not recs[0].fixed_split:
            return recs[:limit]
        by = defaultdict(list)
        for r in recs:
            by[r.fixed_split].append(r)
        return [r for s in by.values() for r in s[:max(1, round(limit * len(s) / len(recs)))]]

    def manifest_extra(self) -> dict:
        return {"celeba_split": self.split_info}
