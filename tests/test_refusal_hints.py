"""Every hint of the empty-split refusal (vaeflow.data.splitcheck) is followed here, and the
prepare that follows it succeeds: a hint that asks for a smaller fraction than the current
one, or one that counts bad files as data, fails these tests."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
from PIL import Image

from vaeflow.data import DataError, prepare_dataset

HINT = re.compile(r"(?:raise|lower|set) data\.split\.(val|test) (?:from ([0-9.]+) to at (?:least|most) |to )([0-9.]+)")


def follow(message: str, cfg: dict) -> dict:
    """The config after doing what the refusal says (each fraction it names)."""
    edits = HINT.findall(message.split("nothing was written:", 1)[1])
    assert edits, f"no fraction hint in: {message}"
    cfg = copy.deepcopy(cfg)
    for split, old, new in edits:
        if old:
            assert float(old) == cfg["split"][split], message
        cfg["split"][split] = float(new)
    return cfg


def refused(cfg: dict, out) -> str:
    with pytest.raises(DataError) as info:
        prepare_dataset(cfg, out)
    assert not out.exists(), "a refused prepare must write nothing"
    return str(info.value)


def images(folder, n, bad=()):
    """n small PNGs named im00.png ...; the indices in bad are corrupt files with a .png name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = folder / f"im{i:02d}.png"
        if i in bad:
            path.write_bytes(b"not a png" * 8)
        else:
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def assert_all_splits(manifest):
    assert all(manifest["counts"][s] > 0 for s in ("train", "val", "test")), manifest["counts"]


def test_too_few_groups_says_add_data_and_adding_it_works(tmp_path):
    images(tmp_path / "raw", 2)
    cfg = {"dataset": "image_dir", "root": str(tmp_path / "raw"), "image_size": 8, "split": {"val": 0.3, "test": 0.3}}
    msg = refused(cfg, tmp_path / "out")
    assert "add data: train, val and test each need at least one of the groups of items (3 in all)" in msg
    images(tmp_path / "raw", 3)  # a third image
    assert_all_splits(prepare_dataset(cfg, tmp_path / "out"))


@pytest.mark.parametrize("n, bad, val, test", [
    (9, (), 0.3, 0.05),          # a fraction that rounds to no group
    (10, (), 0.01, 0.1),         # val too small, test fine
    (12, range(6, 12), 0.1, 0.1),  # bad files (skipped) where val and test fell
    (8, (0, 1, 2, 3, 4), 0.2, 0.2),  # most files bad
])
def test_fraction_hints_work_when_followed(tmp_path, n, bad, val, test):
    images(tmp_path / "raw", n, bad=set(bad))
    cfg = {"dataset": "image_dir", "root": str(tmp_path / "raw"), "image_size": 8, "skip_bad": True,
           "split": {"val": val, "test": test}}
    msg = refused(cfg, tmp_path / "out")
    assert_all_splits(prepare_dataset(follow(msg, cfg), tmp_path / "out"))


def test_ct_with_skipped_files_hints_a_fraction_that_works(tmp_path):
    """The issue's case: bad files counted as series made the hint ask for a smaller val."""
    pytest.importorskip("pydicom")
    from data.test_ct import make_series

    raw = tmp_path / "raw"
    for i in range(3):
        make_series(raw / f"s{i}", 2, f"1.2.3.{i}")
    for i in range(5):
        (raw / f"bad{i}.dcm").write_bytes(b"not a dicom file" * 10)
    cfg = {"dataset": "ct", "root": str(raw), "image_size": 8, "skip_bad": True, "split": {"val": 0.1, "test": 0.1}}
    msg = refused(cfg, tmp_path / "out")
    assert "val would be empty (train=4, val=0, test=2 from 8 CT series after skipping 5 bad item(s), " \
           "which leaves 3 of the CT series with usable items)" in msg, msg
    fixed = follow(msg, cfg)
    assert fixed["split"]["val"] > cfg["split"]["val"], msg  # never a smaller value than now
    assert_all_splits(prepare_dataset(fixed, tmp_path / "out"))


def test_ct_patient_grouping_hint_works(tmp_path):
    pytest.importorskip("pydicom")
    from data.test_ct import make_series

    raw = tmp_path / "raw"
    for i in range(3):  # three series of one patient (CT_small's PatientID)
        make_series(raw / f"s{i}", 2, f"1.2.3.{i}")
    cfg = {"dataset": "ct", "root": str(raw), "image_size": 8, "split": {"val": 0.34, "test": 0.34},
           "ct": {"group_by": "patient"}}
    msg = refused(cfg, tmp_path / "out")
    assert "(or set data.ct.group_by: series)" in msg, msg
    assert_all_splits(prepare_dataset({**cfg, "ct": {"group_by": "series"}}, tmp_path / "out"))


def _default_config():
    import yaml

    from support import REPO

    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _code_level_error(c: dict) -> str | None:
    from vaeflow import config as cfg
    from vaeflow.preflight import check_code_level

    try:
        check_code_level(cfg.validate(c))
    except cfg.ConfigError as exc:
        return str(exc)
    return None


def test_too_many_levels_hint_works():
    c = _default_config()
    c["model"]["ch_mult"] = [1, 2, 2, 2, 2, 2]  # 5 halvings of 16 px
    msg = _code_level_error(c)
    m = re.search(r"use at most (\d+) levels", msg or "")
    assert m, msg
    c["model"]["ch_mult"] = c["model"]["ch_mult"][: int(m.group(1))]
    after = _code_level_error(c)  # the model now fits; a 1x1x1 latent may fail another key
    assert after is None or "model.ch_mult" not in after, after
    c["model"]["ch_mult"] = c["model"]["ch_mult"][:-1]  # one level fewer: a 2x2 latent, and everything passes
    assert _code_level_error(c) is None


def test_resolution_mismatch_hint_works():
    c = _default_config()
    c["model"]["resolution"] = 32
    msg = _code_level_error(c)
    assert msg and "model.resolution" in msg and "set both to the same size" in msg, msg
    c["model"]["resolution"] = c["data"]["image_size"]
    assert _code_level_error(c) is None
