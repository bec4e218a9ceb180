"""Evaluation and sampling on a real CUDA device (skipped without one; CI has none). The
CPU-only stand-in is test_device.py with its simulated device."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from support import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_evaluate_and_sample_on_cuda_match_cpu(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_eval_check", REPO / "benchmarks" / "gpu_eval_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    assert check.run(tmp_path) == []
