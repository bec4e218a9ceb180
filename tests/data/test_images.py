
import numpy as np
import pytest
from PIL import Image

from vaeflow.data import PreparedDataset, prepare_dataset


def _rgb(seed, h=20, w=24):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_images(root, n=10, size=(20, 24), fmt="png"):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(_rgb(i, *size)).save(sub / f"img{i:03d}.{fmt}")
    return root


def test_image_dir_recursive_formats_and_channels(tmp_path):
    root = tmp_path / "raw"
    make_images(root, n=4)
    Image.fromarray(_rgb(10)).save(root / "x.jpg", quality=95)
    Image.fromarray(_rgb(11)).save(root / "x.webp")
    Image.fromarray(_rgb(12)).save(root / "x.bmp")
    Image.fromarray(_rgb(13)).save(root / "x.tiff")
    Image.fromarray(_rgb(14)[..., 0]).save(root / "gray.png")  # L image -> RGB
    Image.fromarray(np.dstack([_rgb(15), np.full((20, 24), 128, np.uint8)])).save(root / "alpha.png")
    (root / "notes.txt").write_text("not an image, ignored")
    (root / ".DS_Store").write_bytes(b"\0\1junk")
    m = prepare_dataset({"dataset": "image_dir", "root": str(root), "image_size": 16,
                         "split": {"val": 0, "test": 0}}, tmp_path / "out")
    assert m["counts"]["train"] == 10 and m["item_shape"] == [3, 16, 16]
    assert m["source"]["n_files"] == 10 and m["source"]["ignored_files"] == 1
    assert "notes.txt" in m["source"]["ignored_examples"]
    assert "b/img000.png" in m["source"]["files"]
    m1 = prepare_dataset({"dataset": "image_dir", "root": str(root), "image_size": 8, "channels": 1,
                          "split": {"val": 0, "test": 0}}, tmp_path / "out1")
    assert m1["item_shape"] == [1, 8, 8]
    x = PreparedDataset(tmp_path / "out1", "train")[0]
    assert x.shape == (1, 8, 8) and 0 <= x.min() <= x.max() <= 1


def test_image_dir_values_resize_and_limit(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, 10:20] = 255  # the center third is white
    Image.fromarray(img).save(root / "a.png")
    m = prepare_dataset({"dataset": "image_dir", "root": str(root), "image_size": 10,
                         "split": {"val": 0, "test": 0}}, tmp_path / "o")
    arr = np.load(tmp_path / "o" / "train.npy")
    # shorter side -> 10 (no-op), then a 10x10 center crop: all white
    assert m["item_shape"] == [3, 10, 10] and arr.min() == 255
    make_images(root / "more", n=6)
    m = prepare_dataset({"dataset": "image_dir", "root": str(root), "image_size": 8, "limit": 3,
                         "split": {"val": 0, "test": 0}}, tmp_path / "o")
    assert m["counts"]["train"] == 3


def test_image_dir_native_size(tmp_path):
    root = make_images(tmp_path / "raw", n=3, size=(12, 12))
    m = prepare_dataset({"dataset": "image_dir", "root": str(root), "split": {"val": 0, "test": 0}},
                        tmp_path / "o")
    assert m["item_shape"] == [3, 12, 12]
    arr = np.load(tmp_path / "o" / "train.npy")
    src = np.asarray(Image.open(root / "a" / "img001.png")).transpose(2, 0, 1)  # sorted first
    np.testing.assert_array_equal(arr[0], src)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    arr16 = np.full((8, 8), 40000, dtype=np.uint16)
    arr16[0, 0] = 65535
    arr16[0, 1] = 0
    Image.fromarray(arr16).save(root / "deep.png")
    assert Image.open(root / "deep.png").mode.startswith("I")
    for dtype, scale in (("uint8", 255), ("uint16", 65535)):
        out = tmp_path / dtype
        m = prepare_dataset({"dataset": "image_dir", "root": str(root), "channels": 1, "dtype": dtype,
                             "split": {"val": 0, "test": 0}}, out)
        assert m["dtype"] == dtype
        x = PreparedDataset(out, "train")[0]
        assert x[0, 3, 3].item() == pytest.approx(40000 / 65535, abs=1 / scale)
        assert x[0, 0, 0].item() == 1.0 and x[0, 0, 1].item() == 0.0


def test_celeba_layout_crop_and_fallback(tmp_path):
    root = tmp_path / "celeba"
    faces = root / "img_align_celeba"
    faces.mkdir(parents=True)
    for i in range(5):
        img = np.zeros((218, 178, 3), np.uint8)
        img[20:198] = 200  # the 178x178 center crop is uniform 200; borders black
        img[..., 2] = i
        Image.fromarray(img).save(faces / f"{i + 1:06d}.jpg", quality=100)
    (root / "list_attr_celeba.txt").write_text("attributes, not an image")
    m = prepare_dataset({"dataset": "celeba", "root": str(root), "image_size": 16,
                         "split": {"val": 0.2, "test": 0.2}, "split_seed": 0}, tmp_path / "o")
    assert m["item_shape"] == [3, 16, 16] and sum(m["counts"].values()) == 5
    assert m["counts"] == {"train": 3, "val": 1, "test": 1}
    assert "000001.jpg" in m["source"]["files"]
    x = PreparedDataset(tmp_path / "o", "train")[0]
    assert abs(x[0].mean().item() - 200 / 255) < 0.02  # black borders were cropped away
    # data.root pointing at the image folder itself also works
    m2 = prepare_dataset({"dataset": "celeba", "root": str(faces), "image_size": 16,
                          "split": {"val": 0.2, "test": 0.2}}, tmp_path / "o2")
    assert sum(m2["counts"].values()) == 5
    m3 = prepare_dataset({"dataset": "celeba", "root": str(root), "limit": 2, "split": {"val": 0, "test": 0}},
                         tmp_path / "o3")
    assert m3["item_shape"] == [3, 178, 178] and sum(m3["counts"].values()) == 2


def test_split_keeps_source_order_and_is_deterministic(tmp_path):
    root = make_images(tmp_path / "raw", n=20, size=(8, 8))
    cfg = {"dataset": "image_dir", "root": str(root), "split_seed": 7, "split": {"val": 0.25, "test": 0.25}}
    a = prepare_dataset(cfg, tmp_path / "a")
    b = prepare_dataset(cfg, tmp_path / "b")
    assert a["counts"] == {"train": 10, "val": 5, "test": 5} and a == b
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(np.load(tmp_path / "a" / f"{s}.npy"), np.load(tmp_path / "b" / f"{s}.npy"))
    every = np.concatenate([np.load(tmp_path / "a" / f"{s}.npy") for s in ("train", "val", "test")])
    assert len({e.tobytes() for e in every}) == 20  # a partition: no item twice
