"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, values 0..16).

Embedded in scikit-learn, so it needs no ``data.root`` and no network.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

import numpy as np

from .base import Record, Source, resize_square, to_channels


class DigitsSource(Source):
    name = "digits"
    default_channels = 1
    native_size = 8

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        images = _digit_images()  # float64 [1797, 8, 8], 0..16
        self._images = (images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8] in [0, 1]
        raw = np.ascontiguousarray(images.astype(np.uint8))
        self.digests["sklearn.datasets.load_digits"] = hashlib.sha256(raw.tobytes()).hexdigest()

    def records(self) -> list[Record]:
        return [Record(key=f"digits[{i}]", group=str(i), ref=i) for i in range(len(self._images))]

    def load(self, record: Record) -> np.ndarray:
        x = resize_square(self._images[record.ref], self.image_size)
        return to_channels(x, self.channels, record.key)

    def iter_items(self, records: Iterable[Record]) -> Iterator[tuple[Record, np.ndarray]]:
        records = list(records)
        for start in range(0, len(records), 512):
            chunk = records[start:start + 512]
            x = resize_square(self._images[[r.ref for r in chunk]], self.image_size)
            for rec, item in zip(chunk, x):
                yield rec, to_channels(item, self.channels, rec.key)


def _digit_images() -> np.ndarray:
    """`sklearn.datasets.load_digits().images`, read straight from the file scikit-learn ships
    (importing sklearn.datasets pulls in scipy: about a second per process); load_digits()
    itself when that file is not where this scikit-learn keeps it."""
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return np.loadtxt(f, delimiter=",")[:, :-1].reshape(-1, 8, 8)
    from sklearn.datasets import load_digits

    return load_digits().images
