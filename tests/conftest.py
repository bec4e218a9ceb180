"""Shared fixtures (helpers live in support.py: conftest modules of sub-folders share its name)."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import make_project, prepare_tiny


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The tiny config's prepared digits (results/data of tests/configs/tiny.yaml), made once
    per session; copy it with support.copy_prepared instead of running prepare again."""
    return prepare_tiny(tmp_path_factory.mktemp("tiny_prepared"))
