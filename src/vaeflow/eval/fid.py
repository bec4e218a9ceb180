"""rFID: the Fréchet Inception distance between test-split reconstructions and the test
images they reconstruct, with the protocol that produced it.

The Inception network is torch-fidelity's port of TensorFlow's 2015-12-05 InceptionV3 (the
graph every published FID uses), run through torchmetrics' `FrechetInceptionDistance`. Its
weights come only from a file on disk: `evaluation.fid_weights`, or torch-fidelity's file name
in `$TORCH_HOME/hub/checkpoints/`. Nothing is downloaded. Without the file, rFID is
`{"available": false, "reason": ...}`. A file whose BatchNorm statistics are still at their
initial values (an untrained network) is refused unless `VAEFLOW_FID_RANDOM_WEIGHTS=1`
(tests only), which logs a warning and marks the number `comparable: false`.
"""

from __future__ import annotations

import contextlib
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from vaeflow.losses.perceptual import sha256_file

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
RANDOM_WEIGHTS_ENV = "VAEFLOW_FID_RANDOM_WEIGHTS"
FEATURES = 2048
INCEPTION_BATCH = 16  # images per Inception forward: bounds its activations (~0.25 GB on CPU)

PREPROCESS = ("images in [0, 1] rounded to uint8 (as if saved to PNG); 1-channel images repeated to RGB; "
              "no crop; resized to 299x299 by TensorFlow-1.x-compatible bilinear interpolation "
              "(torch-fidelity's, antialias off), then scaled to [-1, 1] inside the network")


def weights_path(configured: str | None = None) -> Path:
    """`evaluation.fid_weights`, or torch-fidelity's file name in torch's hub cache."""
    if configured:
        return Path(configured).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _versions() -> dict:
    out = {}
    for pkg in ("torchmetrics", "torch-fidelity"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


@contextlib.contextmanager
def _weights_only_loads():
    """torch-fidelity calls torch.load(weights_only=False); force the safe loader while it runs."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def untrained(module: torch.nn.Module) -> bool:
    """True when every BatchNorm layer still has its initial statistics (mean 0, var 1)."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return bool(bns) and all(
        bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all()) for m in bns)


def _unavailable(reason: str) -> tuple[None, dict]:
    return None, {"available": False, "reason": reason}


def rfid_scorer(eval_cfg: dict, device, spatial_dims: int = 2, log=print):
    """(RFID accumulator, info) or (None, {"available": False, "reason": ...})."""
    limit = eval_cfg.get("fid_images")
    if limit == 0:
        return _unavailable("evaluation.fid_images is 0 (rFID switched off)")
    if spatial_dims != 2:
        return _unavailable("rFID is defined for 2D images (InceptionV3); this data is 3D volumes")
    path = weights_path(eval_cfg.get("fid_weights"))
    if not path.is_file():
        return _unavailable(
            f"rFID needs torch-fidelity's InceptionV3 weights at {path} ({WEIGHTS_FILE}, from {WEIGHTS_URL}; "
            "or set evaluation.fid_weights). vaeflow never downloads them and never uses random weights.")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        with _weights_only_loads():
            metric = FrechetInceptionDistance(feature=FEATURES, normalize=False, antialias=False,
                                              feature_extractor_weights_path=str(path))
    except Exception as exc:  # missing library, unreadable file, a state dict of another network
        return _unavailable(f"cannot build InceptionV3 from {path}: {type(exc).__name__}: {str(exc)[:300]}")
    random_ok = os.environ.get(RANDOM_WEIGHTS_ENV) == "1"
    if untrained(metric.inception):
        if not random_ok:
            return _unavailable(
                f"{path} holds an untrained InceptionV3 (every BatchNorm at mean 0, var 1): refusing it "
                f"({RANDOM_WEIGHTS_ENV}=1 allows that, for tests only)")
    if random_ok:
        log(f"WARNING: {RANDOM_WEIGHTS_ENV}=1: rFID runs on whatever InceptionV3 file is there, "
            f"here {path} (tests only); the number is marked NOT comparable")
    protocol = {
        "metric": f"Fréchet distance between InceptionV3 pool3 ({FEATURES}-d) features of the test "
                  "reconstructions and of the test images they reconstruct",
        "reference": "test split: the first N images (split order) vs their reconstructions "
                     "(same weights and latent as the other reconstruction metrics)",
        "images_cap": limit,
        "preprocess": PREPROCESS,
        "weights": {"file": str(path), "sha256": sha256_file(path), "expected_source": WEIGHTS_URL},
        "library": {**_versions(), "call": f"torchmetrics FrechetInceptionDistance(feature={FEATURES}, "
                                           "antialias=False)"},
        "note": "FID is biased upward at small N: compare numbers only at the same N and protocol",
    }
    info = {"available": True, "comparable": not random_ok, "protocol": protocol}
    return RFID(metric.to(device), limit, info), info


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> uint8 RGB (rounded; gray repeated)."""
    u8 = x.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return u8.repeat(1, 3, 1, 1) if u8.shape[1] == 1 else u8


class RFID:
    """Accumulates Inception statistics of (reconstruction, original) pairs, batch by batch,
    for the first `limit` test images (all when None); memory is the metric's 2048x2048 sums."""

    def __init__(self, metric, limit: int | None, info: dict):
        self.metric, self.limit, self.info, self.n = metric, limit, info, 0

    @torch.no_grad()
    def update(self, rec: torch.Tensor, x: torch.Tensor) -> None:
        take = x.shape[0] if self.limit is None else max(0, min(x.shape[0], self.limit - self.n))
        for s in range(0, take, INCEPTION_BATCH):
            e = min(take, s + INCEPTION_BATCH)
            self.metric.update(to_uint8_rgb(x[s:e]), real=True)
            self.metric.update(to_uint8_rgb(rec[s:e]), real=False)
        self.n += take

    def result(self) -> dict:
        if self.n < 2:
            return {"available": False, "reason": f"rFID needs at least 2 test images, got {self.n}"}
        value = float(self.metric.compute())
        out = {**self.info, "value": value}
        out["protocol"] = {**self.info["protocol"], "images": self.n}
        return out
