from pathlib import Path

import pytest
import yaml

from vaeflow.data import resolve_data_cfg

PRESETS = Path(__file__).resolve().parents[2] / "config" / "presets-data"


@pytest.mark.parametrize("name", ["mnist", "celeba", "ct", "ct3d"])
def test_preset_resolves(name):
    cfg = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    assert set(cfg) == {"data"}
    resolved = resolve_data_cfg(cfg["data"])
    assert resolved["dataset"] == cfg["data"]["dataset"]
    assert resolved["spatial_dims"] == (3 if name == "ct3d" else 2)
