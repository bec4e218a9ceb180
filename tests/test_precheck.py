"""The Snakefile's remembered code-level check: torch is imported once per config, not per dry run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from support import TINY
from vaeflow import config as cfg
from vaeflow.precheck import check_code_level_cached

PROBE = """
import sys, yaml
from vaeflow import config as cfg
from vaeflow.precheck import check_code_level_cached
ran = check_code_level_cached(cfg.validate(yaml.safe_load(open(sys.argv[1]))), sys.argv[2])
print(ran, "torch" in sys.modules)
"""


def probe(config_file, stamps) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, str(config_file), str(stamps)], capture_output=True,
                          text=True, check=True).stdout.split()


def test_second_check_of_the_same_config_imports_no_torch(tmp_path):
    stamps = tmp_path / "stamps"
    assert probe(TINY, stamps) == ["True", "True"]
    assert probe(TINY, stamps) == ["False", "False"]
    other = tmp_path / "other.yaml"
    raw = yaml.safe_load(TINY.read_text())
    raw["model"]["base_ch"] = 16
    other.write_text(yaml.safe_dump(raw))
    assert probe(other, stamps) == ["True", "True"]  # a changed config is checked again
    assert len(list(stamps.iterdir())) == 1  # only the latest pass is remembered


def test_a_failing_check_leaves_no_stamp_and_fails_again(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["model"]["no_such_option"] = 1
    config = cfg.validate(raw)
    for _ in range(2):
        with pytest.raises(cfg.ConfigError, match="no_such_option"):
            check_code_level_cached(config, tmp_path)
    assert not list(tmp_path.iterdir())


def test_lpips_stages_are_always_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEFLOW_LPIPS_RANDOM_BACKBONE", "1")
    raw = yaml.safe_load(TINY.read_text())
    raw["training"]["pipeline"]["defaults"]["use_lpips"] = True
    config = cfg.validate(raw)
    assert check_code_level_cached(config, tmp_path) and check_code_level_cached(config, tmp_path)
    assert not list(tmp_path.iterdir())
