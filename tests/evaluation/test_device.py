"""Evaluation and sampling run on the model's device: tested on CPU with a simulated CUDA
device (device_sim.py: every op must see operands on one device, as on a real GPU).
It proves the tensors are moved through the torch API; the real-GPU run is
benchmarks/gpu_eval_check.py (and tests marked `gpu`)."""

from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch
import yaml

from .conftest import TINY, TinyMLPVAE, TinyVQ
from .device_sim import SimulatedCuda, on_sim
from vaeflow import evaluate as E
from vaeflow import sample as S
from vaeflow.data import PreparedDataset
from vaeflow.eval.perceptual import lpips_per_image
from vaeflow.losses.perceptual import PerceptualLoss
from vaeflow.metrics import to_model_range
from vaeflow.models.loading import load_autoencoder

FAST = {"iw_samples": 2, "nll_max_images": 16, "fid_images": 0, "batch_size": 64}


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("VAEFLOW_LPIPS_RANDOM_BACKBONE", "1")  # so the LPIPS module is on the path too


def test_the_simulation_catches_what_the_issue_reports(kl_run):
    """The two reported GPU failures, replayed: without these errors the other tests prove nothing."""
    x = PreparedDataset(kl_run / "data", "test").tensor()[:4]
    with SimulatedCuda():
        model, _ = load_autoencoder(kl_run / "vae_warmup" / "best.pt", device="cuda")
        p = next(model.parameters())
        assert on_sim(p) and p.device.type == "cuda"
        with pytest.raises(RuntimeError, match="same device"):  # old fit_sigma: dtype moved, device not
            model.ae_forward(to_model_range(x, model).to(p.dtype), sample_posterior=False)
        rec = x.to(p.device)
        with pytest.raises(RuntimeError, match="same device"):  # old LPIPS: network built on CPU
            lpips_per_image(PerceptualLoss("alex", pretrained_backbone=False).lpips)(rec, rec)
        with pytest.raises(TypeError, match="numpy"):
            rec.numpy()


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k not in ("device", "seconds"):
                _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_evaluation_on_the_device_matches_cpu(kl_run):
    ckpt, data = kl_run / "vae_warmup" / "best.pt", kl_run / "data"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)  # the same random LPIPS backbone in both runs
        cpu = E.evaluate_checkpoint(ckpt, data, eval_cfg=FAST)
        torch.manual_seed(0)
        with SimulatedCuda() as sim:
            dev = E.evaluate_checkpoint(ckpt, data, eval_cfg=FAST, device="cuda")
    assert dev["device"] == "cuda:0" and cpu["device"] == "cpu" and sim.ops > 1000
    assert dev["lpips"]["available"] and dev["lpips"]["comparable"] is False
    _close(cpu, dev)  # same seed: the same numbers on every device (random draws come from CPU generators)


@pytest.mark.parametrize("family", ["vq", "vector"])
def test_other_model_families_on_the_device(prepared, family):
    test = PreparedDataset(prepared / "data", "test")
    train = PreparedDataset(prepared / "data", "train")
    torch.manual_seed(0)
    model = (TinyVQ() if family == "vq" else TinyMLPVAE()).eval()
    with SimulatedCuda():
        model.to("cuda")
        m = E.evaluate_model(model, test, train_ds=train, eval_cfg=FAST, recon_type="bce")
    assert m["device"] == "cuda:0" and m["pca"]["components"] >= 4
    assert ("codebook_size" in m["codebook"]) if family == "vq" else m["nll"]["iw_samples"] == 2


def test_sampling_on_the_device_matches_cpu(kl_run, tmp_path):
    for name in ("cpu", "gpu"):
        shutil.copytree(kl_run / "vae_warmup", tmp_path / name / "vae_warmup", ignore=shutil.ignore_patterns("samples"))
        shutil.copytree(kl_run / "data", tmp_path / name / "data")
    cfg = {"traversal_dims": 3, "interpolation_pairs": 2}
    cpu = S.sample_run(tmp_path / "cpu", "vae_warmup", samples=4, sampling_cfg=cfg)
    with SimulatedCuda() as sim:
        gpu = S.sample_run(tmp_path / "gpu", "vae_warmup", samples=4, sampling_cfg=cfg, device="cuda")
    assert sim.ops > 0 and [p.name for p in cpu] == [p.name for p in gpu]
    for a, b in zip(cpu, gpu):
        if a.suffix == ".png":
            assert a.read_bytes() == b.read_bytes(), a.name


def test_evaluation_device_defaults_to_the_training_device(tmp_path, capsys):
    from vaeflow import config as vfconfig
    from vaeflow.cli import _eval_device, main

    cfg = yaml.safe_load(TINY.read_text())
    cfg["training"]["device"] = "cpu"
    assert _eval_device(vfconfig.validate(cfg)) == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error below cannot happen")
    cfg["evaluation"] = {"device": "cuda"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["evaluate", "--config", str(path), "--results", str(tmp_path), "--stage", "vae_warmup"]) == 2
    assert "config error in evaluation.device: 'cuda' but CUDA is not available" in capsys.readouterr().err
