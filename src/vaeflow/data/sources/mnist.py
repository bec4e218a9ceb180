"""``mnist``: the MNIST IDX files, plain or gzipped, with torchvision's names.

Looked up in ``data.root``, ``data.root/MNIST/raw`` (torchvision's layout) and
``data.root/raw``::

    train-images-idx3-ubyte[.gz]   60,000 28x28 images
    t10k-images-idx3-ubyte[.gz]    10,000 28x28 images

When they are absent, ``data.download`` is true and the network is reachable,
they are downloaded with ``torchvision.datasets.MNIST(root, download=True)``
(into ``data.root/MNIST/raw``). Offline, one DataError says where to put them.

Splits: with ``data.split.official: true`` (default) the t10k images are the
test split and ``data.split.val`` of the 60,000 training images (seeded) are
the val split; with ``official: false`` all 70,000 are pooled and split by
``data.split`` fractions like any other dataset.
"""

from __future__ import annotations

import gzip
import socket
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import DataError
from .base import Record, Source, resize_square, to_channels

PARTS = {"train": "train-images-idx3-ubyte", "t10k": "t10k-images-idx3-ubyte"}
SUBDIRS = ("", "MNIST/raw", "raw")
MIRROR_HOST = "ossci-datasets.s3.amazonaws.com"
OFFICIAL_TEST_SHARE = 10_000 / 70_000


def network_reachable(host: str = MIRROR_HOST, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def parse_idx_images(data: bytes, key: str) -> np.ndarray:
    """IDX3 ubyte bytes -> uint8 [N, H, W]; DataError naming ``key`` if malformed."""
    if len(data) < 16:
        raise DataError(f"{key}: truncated IDX file ({len(data)} bytes, header needs 16)")
    magic = int.from_bytes(data[0:4], "big")
    if magic != 0x00000803:
        raise DataError(f"{key}: not an IDX3 ubyte image file (magic 0x{magic:08x}, expected 0x00000803)")
    n, h, w = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    need = 16 + n * h * w
    if len(data) < need:
        raise DataError(f"{key}: truncated IDX file ({len(data)} bytes, header says {n}x{h}x{w} needs {need})")
    return np.frombuffer(data, dtype=np.uint8, count=n * h * w, offset=16).reshape(n, h, w)


class MnistSource(Source):
    name = "mnist"
    default_channels = 1
    handles_limit = True

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        root = cfg.get("root")
        if root in (None, ""):
            raise DataError("data.root is required for dataset 'mnist' (the folder with the MNIST IDX files)")
        self.root = Path(root).expanduser()
        self._images: dict[str, np.ndarray] = {}

    # -- locating / downloading -------------------------------------------
    def find(self, part: str) -> Path | None:
        for sub in SUBDIRS:
            for suffix in ("", ".gz"):
                path = self.root / sub / (PARTS[part] + suffix)
                if path.is_file():
                    return path
        return None

    def _where_msg(self) -> str:
        names = ", ".join(f"{n}[.gz]" for n in PARTS.values())
        return (f"put {names} (plain or gzipped, torchvision's names) in {self.root} "
                f"or {self.root / 'MNIST' / 'raw'}")

    def locate(self) -> dict[str, Path]:
        found = {part: self.find(part) for part in PARTS}
        if all(found.values()):
            return found
        missing = [PARTS[p] for p, f in found.items() if f is None]
        if not self.cfg.get("download", True):
            raise DataError(f"MNIST files not found ({', '.join(missing)}) and data.download is false; "
                            + self._where_msg())
        if not network_reachable():
            raise DataError(f"MNIST files not found ({', '.join(missing)}) and the network is unreachable, "
                            "so they cannot be downloaded; " + self._where_msg())
        self.download()
        found = {part: self.find(part) for part in PARTS}
        if not all(found.values()):
            raise DataError(f"MNIST download into {self.root} did not produce the IDX files; " + self._where_msg())
        return found

    def download(self) -> None:
        try:
            from torchvision.datasets import MNIST

            self.root.mkdir(parents=True, exist_ok=True)
            MNIST(str(self.root), train=True, download=True)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"MNIST download into {self.root} failed ({type(exc).__name__}: {exc}); "
                            + self._where_msg()) from None

    def _load_part(self, part: str, path: Path) -> np.ndarray:
        key = path.relative_to(self.root).as_posix()
        data = self.read_bytes(path, key)
        if path.suffix == ".gz":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as exc:
                raise DataError(f"{key}: corrupt or truncated gzip file ({exc})") from None
        return parse_idx_images(data, key)

    # -- Source API -------------------------------------------------------
    def records(self) -> list[Record]:
        if self.root.exists() and not self.root.is_dir():
            raise DataError(f"data.root {self.root} is not a directory (dataset 'mnist')")
        paths = self.locate()
        self._images = {part: self._load_part(part, path) for part, path in paths.items()}
        n_train, n_test = len(self._images["train"]), len(self._images["t10k"])
        official = bool(self.cfg["split"].get("official", True))
        limit = self.cfg["limit"]
        if limit is not None:
            lim_test = min(n_test, max(1, round(limit * OFFICIAL_TEST_SHARE))) if limit > 1 else 0
            n_train, n_test = min(n_train, limit - lim_test), lim_test
        recs = [Record(f"{PARTS['train']}[{i}]", f"train{i}", ("train", i)) for i in range(n_train)]
        recs += [Record(f"{PARTS['t10k']}[{i}]", f"t10k{i}", ("t10k", i), "test" if official else None)
                 for i in range(n_test)]
        self.official = official
        return recs

    def iter_items(self, records: Iterable[Record]) -> Iterator[tuple[Record, np.ndarray]]:
        records = list(records)
        for start in range(0, len(records), 1024):
            chunk = records[start:start + 1024]
            raw = np.stack([self._images[r.ref[0]][r.ref[1]] for r in chunk])
            x = resize_square(raw[:, None].astype(np.float32) / 255.0, self.image_size)
            for rec, item in zip(chunk, x):
                yield rec, to_channels(item, self.channels, rec.key)

    def manifest_extra(self) -> dict:
        return {"official_test_split": self.official}
