import gzip
from pathlib import Path

import numpy as np
import pytest

from vaeflow.data import DataError, PreparedDataset, prepare_dataset
from vaeflow.data.sources import mnist as mnist_mod

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
NO_SPLIT = {"val": 0.0, "test": 0.0}


def idx_bytes(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    header = (0x803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, h, w))
    return header + images.astype(np.uint8).tobytes()


def write_fake(folder: Path, n_train=12, n_test=5, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        arr = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        data = idx_bytes(arr)
        name = f"{part}-images-idx3-ubyte"
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
        arrays[part] = arr
    return arrays


@pytest.mark.parametrize("gz,sub", [(False, ""), (True, "MNIST/raw")])
def test_mnist_idx_plain_gz_and_torchvision_layout(tmp_path, gz, sub):
    arrays = write_fake(tmp_path / "raw" / sub, gz=gz)
    m = prepare_dataset({"dataset": "mnist", "root": str(tmp_path / "raw"), "split": {"val": 0.25}},
                        tmp_path / "o")
    assert m["counts"] == {"train": 9, "val": 3, "test": 5} and m["official_test_split"] is True
    assert m["item_shape"] == [1, 28, 28] and m["source"]["n_files"] == 2
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "test.npy")[:, 0], arrays["t10k"])
    m2 = prepare_dataset({"dataset": "mnist", "root": str(tmp_path / "raw"), "image_size": 32,
                          "split": {"official": False, "val": 0.2, "test": 0.2}}, tmp_path / "o2")
    assert m2["counts"] == {"train": 11, "val": 3, "test": 3} and m2["item_shape"] == [1, 32, 32]


def test_mnist_offline_error_says_where(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_mod, "network_reachable", lambda *a, **k: False)
    with pytest.raises(DataError) as err:
        prepare_dataset({"dataset": "mnist", "root": str(tmp_path / "none")}, tmp_path / "o")
    msg = str(err.value)
    assert "network is unreachable" in msg and "train-images-idx3-ubyte" in msg and str(tmp_path / "none") in msg
    with pytest.raises(DataError, match="data.download is false"):
        prepare_dataset({"dataset": "mnist", "root": str(tmp_path), "download": False}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_mnist_download_goes_through_torchvision(tmp_path, monkeypatch):
    calls = []

    def fake_download(self):
        calls.append(self.root)
        write_fake(self.root / "MNIST" / "raw", gz=True)

    monkeypatch.setattr(mnist_mod, "network_reachable", lambda *a, **k: True)
    monkeypatch.setattr(mnist_mod.MnistSource, "download", fake_download)
    m = prepare_dataset({"dataset": "mnist", "root": str(tmp_path / "dl")}, tmp_path / "o")
    assert calls == [tmp_path / "dl"] and m["counts"]["test"] == 5


def test_mnist_truncated_and_corrupt_files(tmp_path):
    write_fake(tmp_path / "raw")
    f = tmp_path / "raw" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: truncated IDX file"):
        prepare_dataset({"dataset": "mnist", "root": str(tmp_path / "raw")}, tmp_path / "o")
    f.write_bytes(b"hello, not idx" * 10)
    with pytest.raises(DataError, match="train-images-idx3-ubyte: not an IDX3"):
        prepare_dataset({"dataset": "mnist", "root": str(tmp_path / "raw")}, tmp_path / "o")
    f.unlink()
    write_fake(tmp_path / "gz", gz=True)
    g = tmp_path / "gz" / "t10k-images-idx3-ubyte.gz"
    g.write_bytes(g.read_bytes()[:40])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        prepare_dataset({"dataset": "mnist", "root": str(tmp_path / "gz")}, tmp_path / "o")


@pytest.mark.skipif(not (REAL / "train-images-idx3-ubyte.gz").exists(), reason="real MNIST not present")
def test_real_mnist(tmp_path):
    m = prepare_dataset({"dataset": "mnist", "root": str(REAL), "image_size": 32, "limit": 700},
                        tmp_path / "o")
    assert m["counts"]["test"] == 100 and m["counts"]["val"] == 60 and m["counts"]["train"] == 540
    assert len(m["source"]["files"]) == 2
    x = PreparedDataset(tmp_path / "o", "train")[0]
    assert x.shape == (1, 32, 32) and x.max() > 0.9 and x.min() == 0.0
