"""Shared fixtures (helpers live in support.py: conftest modules of sub-folders share its name)."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import make_project


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(tmp_path / "project")
