"""CelebA splits: the official list_eval_partition.txt when present, else by identity
(identity_CelebA.txt), else per image (recorded as not identity-disjoint)."""

import numpy as np
import pytest
from PIL import Image

from vaeflow.data import DataError, PreparedDataset, prepare_dataset

N = 12
SPLIT_OF = ["0"] * 7 + ["1"] * 2 + ["2"] * 3  # 000001-000007 train, 000008-9 val, 000010-12 test
IDENTITY = [i // 2 for i in range(N)]  # two images per person


def _celeba(tmp_path, partition=True, identity=False, layout="Eval"):
    root = tmp_path / "celeba"
    faces = root / "img_align_celeba"
    faces.mkdir(parents=True)
    for i in range(N):
        img = np.full((218, 178, 3), 10 * i, np.uint8)  # image i has value 10*i: its split is checkable
        Image.fromarray(img).save(faces / f"{i + 1:06d}.png")
    if partition:
        (root / layout).mkdir(exist_ok=True)
        (root / layout / "list_eval_partition.txt").write_text(
            "".join(f"{i + 1:06d}.jpg {s}\n".replace(".jpg", ".png") for i, s in enumerate(SPLIT_OF)))
    if identity:
        (root / "identity_CelebA.txt").write_text("".join(f"{i + 1:06d}.png {p}\n" for i, p in enumerate(IDENTITY)))
    return root


def _prepare(root, out, **data):
    return prepare_dataset({"dataset": "celeba", "root": str(root), "image_size": 8, "split_seed": 3,
                            "split": {"val": 0.2, "test": 0.3}, **data}, out)


def _values(out, split):
    return sorted(round(float(x.mean()) * 255 / 10) for x in PreparedDataset(out, split).tensor())


@pytest.mark.parametrize("layout", ["Eval", "."])
def test_official_partition_is_used(tmp_path, layout):
    m = _prepare(_celeba(tmp_path, layout=layout), tmp_path / "o")
    assert m["counts"] == {"train": 7, "val": 2, "test": 3}
    assert _values(tmp_path / "o", "test") == [9, 10, 11] and _values(tmp_path / "o", "val") == [7, 8]
    assert m["celeba_split"]["method"] == "official list_eval_partition.txt" and m["celeba_split"]["used"] == N
    assert any("list_eval_partition.txt" in f for f in m["source"]["files"])  # checksummed like the images


def test_official_partition_with_identities_counts_crossings(tmp_path):
    m = _prepare(_celeba(tmp_path, identity=True), tmp_path / "o")
    # person 3 (images 7, 8) straddles train/val, person 4 (images 9, 10) val/test
    assert m["celeba_split"]["identities_in_several_splits"] == 2


def test_limit_takes_every_official_split(tmp_path):
    m = _prepare(_celeba(tmp_path), tmp_path / "o", limit=6)
    assert m["counts"]["val"] >= 1 and m["counts"]["test"] >= 1 and m["counts"]["train"] >= 3


def test_identity_split_without_partition(tmp_path):
    m = _prepare(_celeba(tmp_path, partition=False, identity=True), tmp_path / "o")
    assert "identity-disjoint" in m["celeba_split"]["method"] and "NOT" not in m["celeba_split"]["method"]
    person = {s: {v // 2 for v in _values(tmp_path / "o", s)} for s in ("train", "val", "test")}
    assert not (person["train"] & person["test"]) and not (person["train"] & person["val"])
    assert m["groups"]["test"] == round(0.3 * 6)  # fractions of identities, not of images


def test_without_either_file_the_split_says_it_is_not_identity_disjoint(tmp_path):
    m = _prepare(_celeba(tmp_path, partition=False), tmp_path / "o")
    assert "NOT identity-disjoint" in m["celeba_split"]["method"]
    m2 = _prepare(_celeba(tmp_path / "b"), tmp_path / "o2", split={"val": 0.2, "test": 0.3, "official": False})
    assert "NOT identity-disjoint" in m2["celeba_split"]["method"]


def test_bad_partition_files(tmp_path):
    root = _celeba(tmp_path)
    part = root / "Eval" / "list_eval_partition.txt"
    part.write_text(part.read_text().replace("000012.png 2\n", ""))
    with pytest.raises(DataError, match=r"000012.png: not listed in .*list_eval_partition.txt \(1 images"):
        _prepare(root, tmp_path / "o")
    part.write_text("000001.png 0\n000002.png\n")
    with pytest.raises(DataError, match=r"list_eval_partition.txt:2: expected '<image> <value>'"):
        _prepare(root, tmp_path / "o")
    part.write_text("".join(f"{i + 1:06d}.png 5\n" for i in range(N)))
    with pytest.raises(DataError, match=r"split values must be 0, 1 or 2, found \['5'\]"):
        _prepare(root, tmp_path / "o")
    assert not (tmp_path / "o").exists()
