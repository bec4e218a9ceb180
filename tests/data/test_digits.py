import json

import numpy as np
import pytest
import torch

from vaeflow.data import DataError, PreparedDataset, prepare_dataset


@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "digits"
    manifest = prepare_dataset({"dataset": "digits", "image_size": 16, "split_seed": 3}, out)
    return out, manifest


def test_digits_prepared_layout(digits16):
    out, manifest = digits16
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.npy", "train.npy", "val.npy"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["dataset"] == "digits" and manifest["dtype"] == "uint8"
    assert manifest["item_shape"] == [1, 16, 16]
    counts = manifest["counts"]
    assert sum(counts.values()) == 1797
    assert counts["test"] == round(0.1 * 1797) and counts["val"] == round(0.1 * 1797)
    assert manifest["split"]["seed"] == 3
    assert manifest["source"]["n_files"] == 1 and len(manifest["source"]["sha256"]) == 64
    for split in ("train", "val", "test"):
        arr = np.load(out / f"{split}.npy", mmap_mode="r")
        assert arr.dtype == np.uint8 and arr.shape == (counts[split], 1, 16, 16)
        assert manifest["shapes"][split] == list(arr.shape)


def test_prepared_dataset_reads_floats(digits16):
    out, manifest = digits16
    ds = PreparedDataset(out, "train")
    assert len(ds) == manifest["counts"]["train"]
    x = ds[0]
    assert x.dtype == torch.float32 and x.shape == (1, 16, 16)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    assert isinstance(ds.array, np.memmap)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)
    batch = next(iter(loader))
    assert batch.shape == (64, 1, 16, 16) and batch.dtype == torch.float32
    np.testing.assert_allclose(ds[5].numpy(), ds.array[5].astype(np.float32) / 255.0)


def test_digits_native_size_matches_sklearn(tmp_path):
    from sklearn.datasets import load_digits

    manifest = prepare_dataset({"dataset": "digits", "split": {"val": 0.0, "test": 0.0}}, tmp_path / "d")
    assert manifest["counts"] == {"train": 1797, "val": 0, "test": 0}
    arr = np.load(tmp_path / "d" / "train.npy")
    expected = np.rint(load_digits().images / 16.0 * 255).astype(np.uint8)
    np.testing.assert_array_equal(arr[:, 0], expected)
    assert PreparedDataset(tmp_path / "d", "val").__len__() == 0


def test_split_is_deterministic_and_seed_dependent(tmp_path):
    cfg = {"dataset": "digits", "image_size": 8}
    prepare_dataset(dict(cfg, split_seed=1), tmp_path / "a")
    prepare_dataset(dict(cfg, split_seed=1), tmp_path / "b")
    prepare_dataset(dict(cfg, split_seed=2), tmp_path / "c")
    for split in ("train", "val", "test"):
        a, b, c = (np.load(tmp_path / d / f"{split}.npy") for d in "abc")
        np.testing.assert_array_equal(a, b)
        assert a.shape == c.shape and not np.array_equal(a, c)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_rgb_channels_and_limit(tmp_path):
    m = prepare_dataset({"dataset": "digits", "image_size": 8, "channels": 3, "limit": 100}, tmp_path / "d")
    assert m["item_shape"] == [3, 8, 8] and sum(m["counts"].values()) == 100
    x = PreparedDataset(tmp_path / "d", "train")[0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_bad_config_values(tmp_path):
    with pytest.raises(DataError, match="data.dataset: 'nope' is not one of"):
        prepare_dataset({"dataset": "nope"}, tmp_path / "x")
    with pytest.raises(DataError, match="data.split.val"):
        prepare_dataset({"split": {"val": 1.5}}, tmp_path / "x")
    with pytest.raises(DataError, match="must be < 1"):
        prepare_dataset({"split": {"val": 0.6, "test": 0.5}}, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_missing_prepared_dir(tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        PreparedDataset(tmp_path, "train")


def test_getitems_matches_getitem(digits16):
    out, _ = digits16
    ds = PreparedDataset(out, "val")
    idx = [9, 0, 4, 9, -1]
    batch = ds.__getitems__(idx)
    for i, x in zip(idx, batch):
        assert torch.equal(x, ds[i])
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert ds.tensor().shape == (len(ds), 1, 16, 16)


def test_dataset_pickles_without_array(digits16):
    import pickle

    out, _ = digits16
    ds = PreparedDataset(out, "train")
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._arr is None and torch.equal(clone[0], ds[0])
    assert len(pickle.dumps(ds)) < 10_000


def test_manifest_is_plain_json(tmp_path):
    m = prepare_dataset({"dataset": "digits", "root": tmp_path, "limit": 20}, tmp_path / "d")
    assert json.loads((tmp_path / "d" / "manifest.json").read_text()) == m
    assert m["config"]["root"] == str(tmp_path)
