"""``PreparedDataset``: the training-time reader of the prepared form."""

from __future__ import annotations

import mmap
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vaeflow import keyed
from vaeflow.layout import SPLITS, split_file

from .errors import DataError
from .prepare import load_manifest


class PreparedDataset(Dataset):
    """Items of one split of a prepared dataset as float32 tensors in [0, 1].

    ``__getitem__`` returns ``[C, H, W]`` (or ``[C, D, H, W]`` for volumes). The
    array is memory-mapped (``np.load(mmap_mode="r")``), opened lazily in each
    process so DataLoader workers share the page cache instead of pickled copies.

    ``binarize``:
      - ``None``: what the manifest says (``dynamic`` if prepared with
        ``data.binarize: dynamic``, otherwise no change);
      - ``"none"``: values as stored;
      - ``"static"``: one fixed Bernoulli(pixel) draw per item, the same on every
        read: generator seeded with ``(seed, index)``;
      - ``"dynamic"``: a fresh Bernoulli(pixel) draw every time an item is read.
        After ``set_epoch(*key)`` (the trainer calls it with (stage index, epoch)), item i's
        draw is a pure function of (seed, key, i) (``vaeflow.keyed``): the same on any rank,
        in any batch split, and after a resume, and new in every epoch. Without it: a ``torch.Generator`` per process, created on first use. In the
        main process it is seeded with ``seed``; in a DataLoader worker with
        ``(seed, worker_info.seed)``, where ``worker_info.seed`` is the
        DataLoader's per-epoch base seed + worker id, itself drawn from torch's
        global RNG. So ``torch.manual_seed(s)`` plus ``seed`` make the whole
        sequence reproducible for a fixed ``num_workers``, and every epoch (and
        every re-read) gets new samples.
    """

    def __init__(self, root: str | Path, split: str, binarize: str | None = None, seed: int = 0,
                 mmap: bool = True):
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.root = Path(root)
        self.split = split
        self.manifest = load_manifest(self.root)
        if binarize is None:
            binarize = "dynamic" if self.manifest.get("binarize") == "dynamic" else "none"
        if binarize not in ("none", "static", "dynamic"):
            raise DataError(f"binarize must be none, static or dynamic, got {binarize!r}")
        self.binarize = binarize
        self.seed = int(seed)
        self.mmap = mmap
        self.path = self.root / split_file(split)
        if not self.path.is_file():
            raise DataError(f"{self.path}: missing split file in prepared dataset {self.root}")
        self.scale = float(self.manifest.get("scale") or np.iinfo(np.dtype(self.manifest["dtype"])).max)
        self._arr: np.ndarray | None = None
        self._gen: torch.Generator | None = None
        self._gen_key = None
        self._epoch_key: tuple[int, ...] | None = None
        self._len = int(self.manifest["counts"][split])

    # The memmap is opened per process and never pickled.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arr"] = None
        state["_gen"] = None
        state["_gen_key"] = None
        return state

    @property
    def array(self) -> np.ndarray:
        """The raw uint8/uint16 array ``[N, C, ...]`` (memory-mapped)."""
        if self._arr is None:
            try:
                arr = np.load(self.path, mmap_mode="r" if self.mmap else None, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"{self.path}: unreadable prepared array ({exc})") from None
            if arr.shape[0] != self._len:
                raise DataError(f"{self.path}: {arr.shape[0]} items but manifest.json says {self._len}; "
                                "re-run the prepare stage")
            self._arr = arr
        return self._arr

    @property
    def item_shape(self) -> tuple:
        return tuple(self.manifest["item_shape"])

    def __len__(self) -> int:
        return self._len

    def _to_float(self, raw: np.ndarray) -> torch.Tensor:
        # one numpy pass (uint -> float32 and scale); measurably faster than torch's .float().mul_()
        return torch.from_numpy(np.multiply(raw, np.float32(1.0 / self.scale), dtype=np.float32))

    def set_epoch(self, *key: int) -> None:
        """Key dynamic binarization by (seed, *key, item index) from now on."""
        self._epoch_key = tuple(int(k) for k in key)

    def _dynamic_generator(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        key = ("main",) if info is None else ("worker", info.seed)
        if self._gen is None or self._gen_key != key:
            g = torch.Generator()
            if info is None:
                g.manual_seed(self.seed)
            else:
                g.manual_seed(zlib.crc32(f"{self.seed}:{info.seed}".encode()) | (self.seed & 0xFFFFFFFF) << 32)
            self._gen, self._gen_key = g, key
        return self._gen

    def _binarize(self, x: torch.Tensor, indices) -> torch.Tensor:
        if self.binarize == "none":
            return x
        if self.binarize == "dynamic" and self._epoch_key is not None:
            return keyed.bernoulli_rows((self.seed, *self._epoch_key), indices, x)
        if self.binarize == "dynamic":
            return torch.bernoulli(x, generator=self._dynamic_generator())
        out = torch.empty_like(x)  # static: per-item generator seeded by (seed, index)
        for j, idx in enumerate(indices):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(idx)) & 0x7FFF_FFFF_FFFF_FFFF)
            out[j] = torch.bernoulli(x[j], generator=g)
        return out

    def _index(self, index: int) -> int:
        i = int(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {index} out of range for {self.split} split of {self._len} items")
        return i

    def __getitem__(self, index: int) -> torch.Tensor:
        i = self._index(index)
        x = self._to_float(self.array[i])
        return self._binarize(x.unsqueeze(0), [i])[0]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        """Batched read used by ``DataLoader`` (one fancy-indexed memmap read per batch)."""
        idx = [self._index(i) for i in indices]
        if not idx:
            return []
        idx_arr = np.asarray(idx)
        order = np.argsort(idx_arr, kind="stable")
        raw = self.array[idx_arr[order]]  # sorted reads: sequential access on the memmap
        raw = raw[np.argsort(order, kind="stable")]  # back to the requested order
        x = self._binarize(self._to_float(raw), idx)
        return list(x.unbind(0))

    def release_pages(self) -> None:
        """Unmap the pages of the memmap read so far (the page cache keeps them, so a later
        read is a minor fault). Streaming a large split then holds only the current batch's
        pages: without it, random rows (a PCA subsample) map most of a 2 GB file, since the
        kernel maps neighbouring cached pages around every fault."""
        raw = getattr(self._arr, "_mmap", None)  # numpy keeps the mmap of an np.load(mmap_mode=...) array there
        if raw is not None and hasattr(raw, "madvise"):
            raw.madvise(mmap.MADV_DONTNEED)

    def tensor(self) -> torch.Tensor:
        """The whole split as one float32 tensor (for small data that fits in memory)."""
        return self._binarize(self._to_float(self.array[:]), range(self._len))

    def __repr__(self) -> str:
        return (f"PreparedDataset(root={str(self.root)!r}, split={self.split!r}, n={self._len}, "
                f"item_shape={self.item_shape}, binarize={self.binarize!r})")


def stack_items(ds, idx: list[int]) -> torch.Tensor:
    """Items `idx` of any map-style dataset as one [B, ...] tensor; a PreparedDataset reads them
    in one batched memmap read and unmaps the pages after (bounded memory when streaming)."""
    if isinstance(ds, PreparedDataset):
        out = torch.stack(ds.__getitems__(idx))
        ds.release_pages()
        return out
    return torch.stack([ds[i] for i in idx])
