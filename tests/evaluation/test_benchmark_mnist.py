"""benchmarks/mnist_nll.py in its quick mode on the real MNIST files (skipped without them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MNIST = (REPO / ".." / "shared" / "data" / "mnist").resolve()


@pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").exists(), reason=f"no MNIST IDX files in {MNIST}")
def test_quick_mnist_benchmark(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("mnist_nll", REPO / "benchmarks" / "mnist_nll.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--work", str(tmp_path), "--data-root", str(MNIST), "--epochs", "1", "--limit", "600",
                       "--test-limit", "40", "--iw-samples", "20"]) == 0
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["train_images"] == 600 and res["test_images"] == 40 and res["iw_samples"] == 20
    assert res["likelihood"]["kind"] == "bernoulli" and res["binarization"].startswith("dynamic")
    assert res["test_iw_nll_nats"] <= res["test_neg_elbo_nats"]
    assert "| Burda et al. 2015 VAE (k=1) | 3280 | - | 86.76 |" in capsys.readouterr().out
