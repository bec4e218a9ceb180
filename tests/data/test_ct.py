import shutil

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from vaeflow.data import DataError, PreparedDataset, prepare_dataset  # noqa: E402

CT_SMALL = get_testdata_file("CT_small.dcm")
NO_SPLIT = {"val": 0.0, "test": 0.0}


def expected_unit(path, lo=-1000.0, hi=1000.0):
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.clip((hu - lo) / (hi - lo), 0, 1)


def make_series(folder, n, uid, values=None, z0=0.0, shuffle=True):
    """n copies of CT_small with constant pixels (stored value = values[i]) at z = z0 + i."""
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(1).permutation(n) if shuffle else np.arange(n)
    for i in range(n):
        ds = pydicom.dcmread(CT_SMALL)
        v = (values[i] if values is not None else 1024 + 100 * i)
        ds.PixelData = np.full((128, 128), v, dtype=np.int16).tobytes()
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = f"{uid}.{i + 1}"
        ds.ImagePositionPatient = [0.0, 0.0, z0 + float(i)]
        ds.InstanceNumber = n - i  # misleading on purpose: position must win
        ds.save_as(folder / f"img{order[i]:03d}.dcm")


def test_ct_small_hu_window(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    shutil.copy(CT_SMALL, root / "CT_small.dcm")
    m = prepare_dataset({"dataset": "ct", "root": str(root), "split": NO_SPLIT}, tmp_path / "o")
    assert m["dtype"] == "uint16" and m["item_shape"] == [1, 128, 128] and m["counts"]["train"] == 1
    assert m["ct"]["hu_window"] == [-1000.0, 1000.0] and m["source"]["files"].keys() == {"CT_small.dcm"}
    x = PreparedDataset(tmp_path / "o", "train")[0].numpy()[0]
    np.testing.assert_allclose(x, expected_unit(CT_SMALL), atol=1 / 65535 + 1e-6)
    m = prepare_dataset({"dataset": "ct", "root": str(root), "split": NO_SPLIT, "image_size": 64,
                         "ct": {"hu_window": [-160, 240]}}, tmp_path / "o")
    x = PreparedDataset(tmp_path / "o", "train")[0].numpy()
    assert x.shape == (1, 64, 64) and x.max() <= 1 and (x == 0).any()


def test_ct_2d_series_sorted_and_grouped(tmp_path):
    root = tmp_path / "raw"
    make_series(root / "p1", 4, "1.2.3.1")
    make_series(root / "p2", 4, "1.2.3.2")
    make_series(root / "p3", 4, "1.2.3.3")
    m = prepare_dataset({"dataset": "ct", "root": str(root), "split": {"val": 0.34, "test": 0.34}},
                        tmp_path / "o")
    assert m["counts"] == {"train": 4, "val": 4, "test": 4} and m["groups"] == {"train": 1, "val": 1, "test": 1}
    assert m["ct"]["n_series"] == 3
    arr = np.load(tmp_path / "o" / "train.npy").astype(np.float64) / 65535
    hu = arr[:, 0, 0, 0] * 2000 - 1000
    np.testing.assert_allclose(hu, [0, 100, 200, 300], atol=0.05)  # sorted by z, not name/InstanceNumber


def test_ct_3d_volumes(tmp_path):
    root = tmp_path / "raw"
    make_series(root / "a", 7, "1.2.3.10")  # 2 blocks of 3, 1 slice left over
    make_series(root / "b", 3, "1.2.3.11", z0=50)
    m = prepare_dataset({"dataset": "ct", "root": str(root), "spatial_dims": 3, "image_size": 32,
                         "ct": {"volume_depth": 3}, "split": NO_SPLIT}, tmp_path / "o")
    assert m["item_shape"] == [1, 3, 32, 32] and m["layout"] == "NCDHW" and m["counts"]["train"] == 3
    ds = PreparedDataset(tmp_path / "o", "train")
    v = ds[0]
    assert v.shape == (1, 3, 32, 32)
    hu = v[0, :, 5, 5].numpy() * 2000 - 1000
    np.testing.assert_allclose(hu, [0, 100, 200], atol=0.05)
    hu = ds[1][0, :, 5, 5].numpy() * 2000 - 1000
    np.testing.assert_allclose(hu, [300, 400, 500], atol=0.05)


def test_ct_npy_slices_and_volumes(tmp_path):
    root = tmp_path / "raw"
    (root / "pat1").mkdir(parents=True)
    for i in (1, 2, 10):
        np.save(root / "pat1" / f"slice{i}.npy", np.full((16, 16), 100.0 * i, np.float32))
    np.save(root / "vol.npy", np.linspace(-1000, 1000, 4 * 16 * 16).reshape(4, 16, 16).astype(np.int16))
    m = prepare_dataset({"dataset": "ct", "root": str(root), "ct": {"format": "npy"}, "split": NO_SPLIT},
                        tmp_path / "o")
    assert m["counts"]["train"] == 7 and m["groups"]["train"] == 2
    arr = np.load(tmp_path / "o" / "train.npy")[:3, 0, 0, 0].astype(np.float64) / 65535 * 2000 - 1000
    np.testing.assert_allclose(arr, [100, 200, 1000], atol=0.05)  # natural order: slice1, slice2, slice10
    m = prepare_dataset({"dataset": "ct", "root": str(root / "pat1"), "split": NO_SPLIT,
                         "ct": {"format": "npy", "npy_values": "unit"}}, tmp_path / "u")
    assert np.load(tmp_path / "u" / "train.npy").max() == 65535
    m = prepare_dataset({"dataset": "ct", "root": str(root), "spatial_dims": 3, "split": NO_SPLIT,
                         "ct": {"format": "npy", "volume_depth": 2}, "skip_bad": True}, tmp_path / "v")
    assert m["counts"]["train"] == 3 and m["item_shape"] == [1, 2, 16, 16]  # vol.npy: 2 blocks, pat1: 1
    assert m["skipped"]["count"] == 0


def test_ct_bad_dicoms(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    ds = pydicom.dcmread(CT_SMALL)
    del ds.PixelData
    ds.save_as(root / "nopixels.dcm")
    with pytest.raises(DataError, match=r"nopixels.dcm: DICOM has no pixel data"):
        prepare_dataset({"dataset": "ct", "root": str(root)}, tmp_path / "o")
    (root / "nopixels.dcm").unlink()
    shutil.copy(get_testdata_file("rtplan.dcm"), root / "plan.dcm")
    with pytest.raises(DataError, match=r"plan.dcm: DICOM has no pixel data .*RTPLAN"):
        prepare_dataset({"dataset": "ct", "root": str(root)}, tmp_path / "o")
    (root / "plan.dcm").unlink()
    data = open(CT_SMALL, "rb").read()
    (root / "cut.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.dcm: (corrupt or truncated|cannot decode)"):
        prepare_dataset({"dataset": "ct", "root": str(root)}, tmp_path / "o")
    (root / "cut.dcm").unlink()
    (root / "fake.dcm").write_text("hello")
    with pytest.raises(DataError, match=r"fake.dcm: not a DICOM file"):
        prepare_dataset({"dataset": "ct", "root": str(root)}, tmp_path / "o")
    (root / "fake.dcm").unlink()
    with pytest.raises(DataError, match=r"folder is empty"):
        prepare_dataset({"dataset": "ct", "root": str(root)}, tmp_path / "o")
    (root / "README").write_text("no extension, not DICOM: ignored")
    (root / "notes.txt").write_text("ignored")
    with pytest.raises(DataError, match=r"no DICOM files found \(2 other files"):
        prepare_dataset({"dataset": "ct", "root": str(root)}, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_ct_bad_items_skipped_and_counted(tmp_path):
    root = tmp_path / "raw"
    make_series(root / "ok", 3, "1.2.3.20")
    make_series(root / "short", 2, "1.2.3.21")
    (root / "junk.dcm").write_bytes(b"\0" * 300)
    np.save(root / "ignored.npy", np.zeros((4, 4)))
    cfg = {"dataset": "ct", "root": str(root), "spatial_dims": 3, "ct": {"volume_depth": 3}, "split": NO_SPLIT}
    with pytest.raises(DataError, match=r"short/img000.dcm .. short/img001.dcm: series has 2 slices"):
        prepare_dataset(cfg, tmp_path / "o")
    m = prepare_dataset(dict(cfg, skip_bad=True), tmp_path / "o")
    assert m["counts"]["train"] == 1 and m["skipped"]["count"] == 2
    assert sorted(s["file"] for s in m["skipped"]["files"]) == ["junk.dcm", "short/img000.dcm .. short/img001.dcm"]
    assert m["source"]["ignored_files"] == 1
