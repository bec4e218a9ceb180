import numpy as np
import pytest
import torch

from vaeflow.data import PreparedDataset, prepare_dataset

BASE = {"dataset": "digits", "image_size": 8, "limit": 200}


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    out = tmp_path_factory.mktemp("bin") / "gray"
    prepare_dataset(BASE, out)
    return out


def test_static_threshold(tmp_path, gray):
    m = prepare_dataset(dict(BASE, binarize="static", binarize_threshold=0.5), tmp_path / "t")
    assert m["binarize"] == "static"
    arr = np.load(tmp_path / "t" / "train.npy")
    assert set(np.unique(arr)) <= {0, 255}
    np.testing.assert_array_equal(arr == 255, np.load(gray / "train.npy") >= 128)


def test_static_bernoulli_is_seeded(tmp_path, gray):
    a = prepare_dataset(dict(BASE, binarize="static", binarize_seed=1), tmp_path / "a")
    prepare_dataset(dict(BASE, binarize="static", binarize_seed=1), tmp_path / "b")
    prepare_dataset(dict(BASE, binarize="static", binarize_seed=2), tmp_path / "c")
    assert a["config"]["binarize_seed"] == 1
    xa, xb, xc = (np.load(tmp_path / d / "train.npy") for d in "abc")
    np.testing.assert_array_equal(xa, xb)
    assert set(np.unique(xa)) <= {0, 255} and not np.array_equal(xa, xc)
    g = np.load(gray / "train.npy") / 255.0
    assert abs((xa / 255.0).mean() - g.mean()) < 0.01  # unbiased Bernoulli(pixel)
    x = PreparedDataset(tmp_path / "a", "train")[0]
    assert set(x.unique().tolist()) <= {0.0, 1.0}


def test_dynamic_resamples_every_read_and_is_seeded(gray):
    ds = PreparedDataset(gray, "train", binarize="dynamic", seed=5)
    first, second = ds[3], ds[3]
    assert set(first.unique().tolist()) <= {0.0, 1.0} and not torch.equal(first, second)
    again = PreparedDataset(gray, "train", binarize="dynamic", seed=5)
    assert torch.equal(again[3], first) and torch.equal(again[3], second)
    other = PreparedDataset(gray, "train", binarize="dynamic", seed=6)
    assert not torch.equal(other[3], first)
    plain = PreparedDataset(gray, "train", binarize="none")
    mean = torch.stack([ds[3] for _ in range(400)]).mean(0)
    assert (mean - plain[3]).abs().max() < 0.12


def test_dynamic_with_workers_is_reproducible_and_fresh_each_epoch(gray):
    ds = PreparedDataset(gray, "train", binarize="dynamic", seed=0)

    def epoch_batches():
        loader = torch.utils.data.DataLoader(ds, batch_size=40, num_workers=2, shuffle=False)
        return torch.cat(list(loader))

    torch.manual_seed(0)
    e1, e2 = epoch_batches(), epoch_batches()
    torch.manual_seed(0)
    r1 = epoch_batches()
    assert torch.equal(e1, r1) and not torch.equal(e1, e2)


def test_read_time_static_and_manifest_default(tmp_path, gray):
    ds = PreparedDataset(gray, "train", binarize="static", seed=3)
    assert torch.equal(ds[7], ds[7]) and set(ds[7].unique().tolist()) <= {0.0, 1.0}
    batch = ds.__getitems__([7, 2, 7])
    assert torch.equal(batch[0], ds[7]) and torch.equal(batch[2], ds[7]) and torch.equal(batch[1], ds[2])
    assert PreparedDataset(gray, "train").binarize == "none"
    prepare_dataset(dict(BASE, binarize="dynamic"), tmp_path / "d")
    assert np.array_equal(np.load(tmp_path / "d" / "train.npy"), np.load(gray / "train.npy"))  # stored gray
    ds = PreparedDataset(tmp_path / "d", "train")
    assert ds.binarize == "dynamic" and PreparedDataset(tmp_path / "d", "train", binarize="none").binarize == "none"
