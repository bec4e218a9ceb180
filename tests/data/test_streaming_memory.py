"""Streaming a large prepared split keeps the process's memory bounded (issue: evaluation of a
CelebA-sized set under 3 GB). Random rows of a memmap make the kernel map neighbouring cached
pages around every fault, so without `release_pages` a PCA subsample maps most of the file."""

import json

import numpy as np
import pytest
import torch

from vaeflow.data.dataset import PreparedDataset, stack_items

N, SHAPE = 12_000, (3, 64, 64)  # 147 MB of uint8


def rss_file_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.fixture(scope="module")
def big_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    arr = np.lib.format.open_memmap(root / "train.npy", "w+", np.uint8, (N, *SHAPE))
    for s in range(0, N, 2000):
        arr[s:s + 2000] = np.random.default_rng(s).integers(0, 256, (min(N, s + 2000) - s, *SHAPE), dtype=np.uint8)
    arr.flush()
    del arr
    counts = {"train": N, "val": 0, "test": 0}
    for split in ("val", "test"):
        np.save(root / f"{split}.npy", np.zeros((0, *SHAPE), np.uint8))
    (root / "manifest.json").write_text(json.dumps({
        "format": 1, "dataset": "synthetic", "dtype": "uint8", "scale": 255, "item_shape": list(SHAPE),
        "layout": "NCHW", "spatial_dims": 2, "shapes": {k: [v, *SHAPE] for k, v in counts.items()},
        "counts": counts, "binarize": "none"}))
    return root


def random_rows(ds, read) -> float:
    """RssFile growth (MB) while reading 1,500 random rows (18 MB of data) in chunks of 250."""
    idx = np.sort(np.random.default_rng(0).choice(N, 1500, replace=False))
    before = rss_file_mb()
    for s in range(0, len(idx), 250):
        x = read(ds, idx[s:s + 250].tolist())
        assert x.shape == (len(idx[s:s + 250]), *SHAPE)
    return rss_file_mb() - before


def test_random_rows_stay_unmapped(big_split):
    kept = random_rows(PreparedDataset(big_split, "train"), lambda ds, i: np.stack(ds.__getitems__(i)))
    released = random_rows(PreparedDataset(big_split, "train"), stack_items)
    # The plain read maps far more than the rows it read (the reason for release_pages) ...
    assert kept > 40, kept
    # ... the released one at most one chunk's pages beyond them.
    assert released < 15, (released, kept)


def test_stack_items_reads_the_same_values(big_split):
    ds = PreparedDataset(big_split, "train")
    idx = [5, 11_999, 0, 7]
    a = stack_items(ds, idx)
    fresh = PreparedDataset(big_split, "train")
    b = torch.stack([fresh[i] for i in idx])  # the one-item path
    assert a.dtype == b.dtype and bool((a == b).all())
    assert stack_items([a[0], a[1]], [1, 0]).shape == (2, *SHAPE)  # any map-style dataset
