"""Deterministic data order: epoch e of stage s always visits the same permutation.

The order is a pure function of (seed, stage index, epoch), so resuming needs only
the epoch and the batch index, not a pickled sampler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


def epoch_order(n: int, seed: int, stage_index: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + stage_index * 10_007 + epoch) % 2**63)
    return torch.randperm(n, generator=g)


def batches_per_epoch(n: int, batch_size: int, max_steps: int | None) -> int:
    # Drop the incomplete last batch (BatchNorm and GAN statistics dislike tiny batches),
    # unless the split is smaller than one batch.
    nb = max(1, n // batch_size)
    return min(nb, max_steps) if max_steps else nb


def _as_image(item) -> torch.Tensor:
    if isinstance(item, (tuple, list)):  # (image, label) datasets
        item = item[0]
    if not torch.is_tensor(item):
        item = torch.as_tensor(item)
    return item.float()


class BatchFetcher:
    """Fetches batches by index list; uses a dataset's `get_batch` when it has one."""

    def __init__(self, dataset: Dataset, workers: int = 0, size: int | None = None, spatial_dims: int = 2):
        self.dataset, self.workers, self.size, self.spatial_dims = dataset, workers, size, spatial_dims

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, *key: int) -> None:
        """Key the dataset's per-item random draws (dynamic binarization) by `key`."""
        from vaeflow.data import PreparedDataset

        if isinstance(self.dataset, PreparedDataset):
            self.dataset.set_epoch(*key)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        # Library users may hand in images of another size: resize them to data.image_size.
        spatial = tuple(x.shape[2:])
        target = spatial[:-2] + (self.size, self.size)  # in-plane only: volume depth is kept
        if self.size is None or spatial == target:
            return x
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        return F.interpolate(x, size=target, mode=mode, align_corners=False).clamp(0, 1)

    def fetch(self, indices: torch.Tensor) -> torch.Tensor:
        if hasattr(self.dataset, "get_batch"):
            return self._resize(self.dataset.get_batch(indices.tolist()))
        if hasattr(self.dataset, "__getitems__"):  # one batched read (PreparedDataset's memmap)
            return self._resize(torch.stack([_as_image(i) for i in self.dataset.__getitems__(indices.tolist())]))
        return self._resize(torch.stack([_as_image(self.dataset[int(i)]) for i in indices]))

    def iterate(self, order: torch.Tensor, batch_size: int, start: int, stop: int, shard=None):
        """Yield (indices, images) of batches start..stop-1 of the given order (this rank's
        slice of each, with `shard`)."""
        chunks = [order[b * batch_size : (b + 1) * batch_size] for b in range(start, stop)]
        if shard is not None:
            chunks = [shard(c) for c in chunks]
        if self.workers == 0 or hasattr(self.dataset, "__getitems__"):
            for idx in chunks:
                yield idx, self.fetch(idx)
            return
        loader = DataLoader(
            self.dataset, batch_sampler=[c.tolist() for c in chunks], num_workers=self.workers,
            collate_fn=lambda items: torch.stack([_as_image(i) for i in items]),
        )
        for idx, x in zip(chunks, loader):
            yield idx, self._resize(x)
