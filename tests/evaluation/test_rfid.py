"""rFID: InceptionV3 weights only from a file on disk (never downloaded, never unpickled
unsafely), the protocol recorded in metrics.json, untrained weights only behind the loud
test opt-in. No real Inception weights exist here: the tests use an untrained network."""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
import warnings
from importlib.metadata import version

import pytest
import torch

from .device_sim import SimulatedCuda
from vaeflow import evaluate as E
from vaeflow.eval import fid as F


@pytest.fixture(autouse=True)
def _clean_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(F.RANDOM_WEIGHTS_ENV, raising=False)
    monkeypatch.delenv("VAEFLOW_LPIPS_RANDOM_BACKBONE", raising=False)


def test_without_the_weights_file_rfid_says_where_it_goes(tmp_path):
    scorer, info = F.rfid_scorer({"fid_images": 10}, "cpu")
    assert scorer is None and set(info) == {"available", "reason"} and info["available"] is False
    want = tmp_path / "torch-home" / "hub" / "checkpoints" / F.WEIGHTS_FILE
    assert str(want) in info["reason"] and "never downloads" in info["reason"]
    _, info = F.rfid_scorer({"fid_weights": str(tmp_path / "mine.pth")}, "cpu")
    assert str(tmp_path / "mine.pth") in info["reason"]


def test_switched_off_or_volumes():
    assert "fid_images is 0" in F.rfid_scorer({"fid_images": 0}, "cpu")[1]["reason"]
    assert "3D volumes" in F.rfid_scorer({"fid_images": 5}, "cpu", spatial_dims=3)[1]["reason"]


def test_untrained_weights_are_refused_without_the_opt_in(random_inception, tmp_path):
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / F.WEIGHTS_FILE).symlink_to(random_inception)  # found under torch-fidelity's name
    scorer, info = F.rfid_scorer({"fid_images": 10}, "cpu")
    assert scorer is None and "untrained InceptionV3" in info["reason"] and F.RANDOM_WEIGHTS_ENV in info["reason"]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what an unsafe torch.load would run
        return (pathlib.Path.touch, (self.marker,))


def test_a_pickle_that_runs_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / F.WEIGHTS_FILE
    torch.save({"Conv2d_1a_3x3.conv.weight": _Payload(marker)}, path)
    scorer, info = F.rfid_scorer({"fid_weights": str(path)}, "cpu")
    assert scorer is None and "cannot build InceptionV3" in info["reason"]
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_uint8_conversion_rounds_and_repeats_gray():
    x = torch.tensor([0.0, 0.5 / 255, 0.51 / 255, 1.2, -0.1]).view(1, 1, 1, 5)
    u8 = F.to_uint8_rgb(x)
    assert u8.dtype == torch.uint8 and u8.shape == (1, 3, 1, 5)
    assert u8[0, 0, 0].tolist() == [0, 0, 1, 255, 0] and torch.equal(u8[0, 0], u8[0, 2])


@pytest.mark.slow
def test_accumulator_counts_caps_and_measures(random_inception):
    """The streaming accumulator on the 64-d (early-layer) features, which are cheap: the
    distance of a set to itself is ~0, to a perturbed copy it is larger; the cap holds."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    def rfid():
        with F._weights_only_loads():
            metric = FrechetInceptionDistance(feature=64, antialias=False,
                                              feature_extractor_weights_path=str(random_inception))
        return F.RFID(metric, 10, {"protocol": {}})

    x = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    same, other = rfid(), rfid()
    for s in range(0, 12, 4):  # batches that straddle the cap
        same.update(x[s:s + 4], x[s:s + 4])
        other.update((x[s:s + 4] + 0.3).clamp(0, 1), x[s:s + 4])
    assert same.n == other.n == 10
    d_same, d_other = same.result()["value"], other.result()["value"]
    assert abs(d_same) < 1e-3 * d_other and d_other > 0
    assert same.result()["protocol"]["images"] == 10


@pytest.mark.slow
def test_rfid_and_its_protocol_in_metrics_json(kl_run, random_inception, monkeypatch, capsys):
    """The product path end to end (2048-d pool3 features, torchmetrics FID), with the
    untrained file behind the opt-in, on the simulated CUDA device (device_sim.py)."""
    monkeypatch.setenv(F.RANDOM_WEIGHTS_ENV, "1")
    cfg = {"iw_samples": 1, "nll_max_images": 4, "fid_images": 3, "fid_weights": str(random_inception)}
    with warnings.catch_warnings(), SimulatedCuda() as sim:
        warnings.simplefilter("ignore")
        m = E.evaluate_checkpoint(kl_run / "vae_warmup" / "best.pt", kl_run / "data", eval_cfg=cfg, device="cuda")
    assert sim.ops > 0 and m["device"] == "cuda:0"
    r = m["rfid"]
    assert r["available"] is True and r["comparable"] is False and math.isfinite(r["value"])
    p = r["protocol"]
    assert p["images"] == 3 and p["images_cap"] == 3 and "test split" in p["reference"]
    assert "299x299" in p["preprocess"] and "repeated to RGB" in p["preprocess"] and "uint8" in p["preprocess"]
    assert p["weights"]["sha256"] == hashlib.sha256(random_inception.read_bytes()).hexdigest()
    assert p["library"]["torchmetrics"] == version("torchmetrics")
    assert p["library"]["torch-fidelity"] == version("torch-fidelity")
    assert "WARNING" in capsys.readouterr().out
    assert "rFID" in E.summary_line("s", m) and "NOT comparable" in E.summary_line("s", m)
