"""benchmarks/bench_autoencoder_kl.py runs (CPU smoke run, no diffusers) and prints its table last."""

from __future__ import annotations

import sys

import pytest
import torch

from support import REPO, run

BENCH = str(REPO / "benchmarks" / "bench_autoencoder_kl.py")


@pytest.mark.slow
def test_cpu_smoke_run_without_diffusers_prints_the_table_last(tmp_path):
    res = run([sys.executable, BENCH, "--quick", "--no-diffusers", "--size", "16", "--channels", "32,32", "--layers", "1",
               "--steps", "1", "--quality-steps", "1", "--threads", "1"], tmp_path)
    out = res.stdout
    assert "no diffusers baseline: --no-diffusers; speed-ups are against ours fp32" in out
    assert "MFU (bf16)" in out and "held-out PSNR after" in out
    table = out[out.index("variant "):].splitlines()
    names = [line.split("  ")[0] for line in table[1:5]]
    assert names == ["ours fp32", "ours fp32 channels_last", "ours bf16", "ours bf16 channels_last"]
    assert "1.00x" in table[1].split()  # the baseline against itself
    assert out.strip().splitlines()[-1].startswith("total wall time")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_request_without_cuda_says_so(tmp_path):
    res = run([sys.executable, BENCH, "--device", "cuda"], tmp_path, check=False)
    assert res.returncode != 0 and "--device cuda: CUDA is not available on this machine" in res.stderr
