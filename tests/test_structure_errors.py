"""Structural model errors and empty splits: one line naming the key, exit 2, nothing written."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import yaml

from support import TINY, run
from vaeflow import config as vfconfig
from vaeflow.preflight import check_code_level

BASE = yaml.safe_load(TINY.read_text())  # 8x8 digits, ch_mult [1, 2], a 1-layer PatchGAN


def with_changes(**changes) -> dict:
    c = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = c
        for p in parents:
            node = node[p]
        node[key] = value
    return c


CASES = {
    "empty_ch_mult": ({"model__ch_mult": []}, "model.ch_mult", "non-empty list"),
    "not_divisible": ({"data__image_size": 6, "model__resolution": 6, "model__ch_mult": [1, 2, 2]},
                      "model.ch_mult", "need image sides divisible by 4"),
    "latent_below_1px": ({"model__ch_mult": [1, 1, 1, 1, 1]}, "model.ch_mult", "below 1 pixel of latent"),
    "disc_too_deep": ({"discriminator__n_layers": 4}, "discriminator.n_layers", "too deep for images of 8x8"),
    "resolution_mismatch": ({"model__resolution": 16}, "model.resolution", "data's images are 8x8"),
    "channels_mismatch": ({"model__in_channels": 3}, "model.in_channels", "the data has 1 channel"),
    "huge_width": ({"model__base_ch": 10**9}, "model.base_ch", "out of range"),
    "huge_depth": ({"model__num_res_blocks": 10**6}, "model.num_res_blocks", "must be in 0..32"),
    "huge_disc": ({"discriminator__ndf": 10**6}, "discriminator.ndf", "parameters: more than"),
    "missing_weights": ({"model__ckpt_path": "nope.pt"}, "model.ckpt_path", "no such file"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_structural_error_names_the_key(name):
    changes, key, message = CASES[name]
    with pytest.raises(vfconfig.ConfigError) as info:
        check_code_level(vfconfig.validate(with_changes(**changes)))
    assert info.value.path == key and message in str(info.value), str(info.value)


def test_presets_pass_the_structure_check():
    from support import REPO

    for path in sorted((REPO / "config").glob("*.yaml")):
        if path.name == "schema.yaml":
            continue
        c = vfconfig.load(path)
        c["model"].pop("ckpt_path", None)  # pretrained weights the user downloads (tests/models/test_pretrained.py)
        from vaeflow.model_fit import check_model_fits

        assert check_model_fits(c) is not None, path


def test_validate_command_prints_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(with_changes(model__ch_mult=[])))
    res = run(["vaeflow", "validate", str(path)], tmp_path, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "vaeflow: error: config error in model.ch_mult: must be a non-empty list of positive integers "
        "(one entry per resolution level), got []"]


def test_ct_two_series_is_refused_with_counts_and_nothing_written(tmp_path):
    """The issue's case: 8 good slices in 2 series gave val=0, then training died."""
    pytest.importorskip("pydicom")
    from data.test_ct import make_series

    raw = tmp_path / "raw"
    make_series(raw / "s1", 4, "1.2.3.1")
    make_series(raw / "s2", 4, "1.2.3.2")
    cfg = copy.deepcopy(BASE)
    cfg["data"] = {"dataset": "ct", "root": str(raw), "image_size": 8, "channels": 1}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run(["vaeflow", "prepare", "--config", str(path), "--results", str(tmp_path / "results")], tmp_path,
              check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert "data.split: val and test would be empty (train=8, val=0, test=0 from 2 CT series)" in line
    assert "nothing was written" in line and "at least one of the CT series (3 in all)" in line
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.npy"))


def test_small_fraction_is_refused_with_the_fraction_that_works(tmp_path):
    from vaeflow.data import DataError, prepare_dataset

    with pytest.raises(DataError) as info:
        prepare_dataset({"dataset": "digits", "limit": 9, "split": {"val": 0.3, "test": 0.05}}, tmp_path / "d")
    msg = str(info.value)
    assert "test would be empty (train=6, val=3, test=0 from 9 groups of items)" in msg, msg
    assert "raise data.split.test from 0.05 to at least 0.06" in msg
    assert not (tmp_path / "d").exists()
    m = prepare_dataset({"dataset": "digits", "limit": 9, "split": {"val": 0.3, "test": 0.06}}, tmp_path / "d")
    assert all(m["counts"][s] > 0 for s in ("train", "val", "test")), json.dumps(m["counts"])


def test_one_line_errors_name_real_exception_classes():
    """The CLI catches errors by module name (so a refused command imports no more than it
    used): each entry must still name an exception class of that module."""
    import importlib

    from vaeflow.cli import _ONE_LINE_ERRORS

    for module, name in _ONE_LINE_ERRORS.items():
        cls = getattr(importlib.import_module(module), name)
        assert isinstance(cls, type) and issubclass(cls, Exception), f"{module}.{name}"


def test_a_refused_prepare_imports_no_torch(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(with_changes(data__image_size="big")))
    code = ("import sys; from vaeflow.cli import main; rc = main(['prepare', '--config', sys.argv[1]]); "
            "print('torch' in sys.modules); sys.exit(rc)")
    res = run([sys.executable, "-c", code, str(path)], tmp_path, check=False)
    assert res.returncode == 2 and res.stdout.split() == ["False"], res.stdout + res.stderr
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("vaeflow: error: config error in ") and "data.image_size: 'big' is not of type" in line
