"""Every bad-data case gives one DataError naming the file; skip_bad skips and counts;
the prepared dir is written atomically."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from vaeflow.data import DataError, PreparedDataset, prepare_dataset
from vaeflow.data.sources import image_dir as image_dir_mod


def good_images(root, n=6, size=(16, 16)):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(root / f"ok{i}.png")
    return root


def jpeg_bytes(size=(64, 64)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, size + (3,), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def cfg(root, **kw):
    return dict({"dataset": "image_dir", "root": str(root), "image_size": 8}, **kw)


@pytest.mark.parametrize("name,content,pattern", [
    ("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, r"corrupt.png: (corrupt or truncated|not an image)"),
    ("truncated.jpg", None, r"truncated.jpg: corrupt or truncated image"),
    ("text.jpg", b"just some text, not a jpeg", r"text.jpg: not an image file"),
    ("empty.webp", b"", r"empty.webp: empty file \(0 bytes\)"),
])
def test_bad_image_named(tmp_path, name, content, pattern):
    root = good_images(tmp_path / "raw")
    if content is None:
        data = jpeg_bytes()
        content = data[: len(data) // 2]
    (root / "sub").mkdir()
    (root / "sub" / name).write_bytes(content)
    with pytest.raises(DataError, match="sub/" + pattern):
        prepare_dataset(cfg(root), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temp dirs left behind
    m = prepare_dataset(cfg(root, skip_bad=True), tmp_path / "out")
    assert m["skipped"]["count"] == 1 and m["skipped"]["files"][0]["file"] == f"sub/{name}"
    assert sum(m["counts"].values()) == 6


def test_truncated_png(tmp_path):
    root = good_images(tmp_path / "raw")
    data = (root / "ok0.png").read_bytes()
    (root / "ok0.png").write_bytes(data[: len(data) - 40])
    with pytest.raises(DataError, match=r"ok0.png: corrupt or truncated image"):
        prepare_dataset(cfg(root), tmp_path / "out")


def test_empty_folder_and_only_non_images(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match=r"raw: folder is empty, no images found"):
        prepare_dataset(cfg(tmp_path / "raw"), tmp_path / "out")
    (tmp_path / "raw" / "labels.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"raw: no images found .*1 other files, e.g. labels.csv"):
        prepare_dataset(cfg(tmp_path / "raw"), tmp_path / "out")
    (tmp_path / "celeba" / "img_align_celeba").mkdir(parents=True)
    with pytest.raises(DataError, match=r"img_align_celeba: folder is empty"):
        prepare_dataset({"dataset": "celeba", "root": str(tmp_path / "celeba")}, tmp_path / "out")


def test_missing_or_unset_root(tmp_path):
    for ds in ("image_dir", "celeba", "ct"):
        with pytest.raises(DataError, match=rf"data.root {tmp_path / 'nope'} does not exist \(dataset '{ds}'\)"):
            prepare_dataset({"dataset": ds, "root": str(tmp_path / "nope")}, tmp_path / "out")
        with pytest.raises(DataError, match=rf"data.root is required for dataset '{ds}'"):
            prepare_dataset({"dataset": ds}, tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        prepare_dataset(cfg(tmp_path / "file"), tmp_path / "out")


def test_mixed_sizes(tmp_path):
    root = good_images(tmp_path / "raw", n=3)
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(root / "zodd.png")
    with pytest.raises(DataError, match=r"zodd.png: size 12x20 differs from 16x16 of the first item, ok0.png"
                       r"; mixed sizes need data.image_size"):
        prepare_dataset(cfg(root, image_size=None, split={"val": 0, "test": 0}), tmp_path / "out")
    m = prepare_dataset(cfg(root, image_size=None, skip_bad=True, split={"val": 0, "test": 0}), tmp_path / "out")
    assert m["counts"]["train"] == 3 and m["skipped"]["files"][0]["file"] == "zodd.png"
    m = prepare_dataset(cfg(root, split={"val": 0.25, "test": 0.25}), tmp_path / "out")  # with image_size every image is resized
    assert sum(m["counts"].values()) == 4


def test_all_bad_is_an_error_even_with_skip_bad(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.png").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"every item was bad \(1 skipped\)"):
        prepare_dataset(cfg(tmp_path / "raw", skip_bad=True), tmp_path / "out")


def test_unexpected_decoder_error_still_names_file(tmp_path, monkeypatch):
    root = good_images(tmp_path / "raw", n=2)

    def boom(data, key, channels):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(image_dir_mod, "decode_image", boom)
    with pytest.raises(DataError, match=r"ok0.png: cannot read \(RuntimeError: decoder exploded\)"):
        prepare_dataset(cfg(root), tmp_path / "out")


def test_failed_prepare_keeps_existing_good_dir(tmp_path):
    root = good_images(tmp_path / "raw")
    out = tmp_path / "out"
    good = prepare_dataset(cfg(root), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (root / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        prepare_dataset(cfg(root), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]
    assert PreparedDataset(out, "train").manifest == good
    # a successful re-run replaces it completely
    (root / "bad.png").unlink()
    m = prepare_dataset(cfg(root, image_size=4), out)
    assert m["item_shape"] == [3, 4, 4] and json.loads((out / "manifest.json").read_text()) == m
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


def test_interrupted_prepare_leaves_no_complete_looking_dir(tmp_path, monkeypatch):
    root = good_images(tmp_path / "raw")
    calls = {"n": 0}
    real = image_dir_mod.decode_image

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(image_dir_mod, "decode_image", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg(root), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_refuses_to_replace_foreign_dir(tmp_path):
    root = good_images(tmp_path / "raw")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"holds files that are not prepared data \(precious.txt\)"):
        prepare_dataset(cfg(root), tmp_path / "out")
    assert (tmp_path / "out" / "precious.txt").exists()


def test_prepared_dataset_detects_tampering(tmp_path):
    root = good_images(tmp_path / "raw")
    prepare_dataset(cfg(root, split={"val": 0, "test": 0}), tmp_path / "out")
    np.save(tmp_path / "out" / "train.npy", np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"train.npy: 2 items but manifest.json says 6"):
        PreparedDataset(tmp_path / "out", "train")[0]
    with pytest.raises(DataError, match="split must be one of"):
        PreparedDataset(tmp_path / "out", "training")
