"""Peak memory and time of `vaeflow evaluate` at CelebA size, against the old PCA baseline.

Builds a synthetic prepared CelebA-sized dataset (202,599 images, 3x64x64 uint8, memory-mapped
`.npy` files, 2.5 GB; official split sizes 162,770 / 19,867 / 19,962) and a tiny untrained
AutoencoderKL with CelebA's 8x8x4 latent (256 dims), then runs in child processes:

- `evaluate`: `vaeflow.evaluate.evaluate_checkpoint` with the shipped defaults (PCA on at
  most 10,000 train images, every metric streamed over the whole 19,962-image test split),
  LPIPS on a RANDOM backbone and rFID on an UNTRAINED InceptionV3 (the test-only opt-ins: no
  weights are on this machine; the memory is the same, the numbers mean nothing), rFID
  capped at `--fid-images`, ELBO / IW-NLL at `--iw-samples` on `--nll-images` images;
- `baseline`: the previous PCA baseline (whole train split as float32, scikit-learn full
  SVD) on `--baseline-images` train images, and its memory at full size computed from the
  arrays it allocates (it cannot run here: 24 GB machine).

Each child reports its peak RSS (`ru_maxrss`, which counts memory-mapped pages read).

    python benchmarks/bench_eval_memory.py [--work /tmp/vaeflow-bench-eval] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

COUNTS = {"train": 162_770, "val": 19_867, "test": 19_962}  # CelebA's official partition
SHAPE = (3, 64, 64)
MODEL = {"type": "autoencoder_kl", "in_channels": 3, "resolution": 64, "base_ch": 4, "ch_mult": [1, 1, 1, 1],
         "num_res_blocks": 1, "attn_resolutions": [], "embed_dim": 4, "z_channels": 4, "norm_groups": 4}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_data(root: Path, scale: float) -> dict:
    """Memory-mapped uint8 splits of smooth random images (8x8 noise upsampled), written in chunks."""
    counts = {k: max(2, int(v * scale)) for k, v in COUNTS.items()}
    manifest = root / "data" / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["counts"] == counts:
        return counts
    (root / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in counts.items():
        arr = np.lib.format.open_memmap(root / "data" / f"{split}.npy", "w+", np.uint8, (n, *SHAPE))
        for s in range(0, n, 4096):
            m = min(n, s + 4096) - s
            low = rng.integers(0, 256, (m, 3, 8, 8), dtype=np.uint8)
            arr[s:s + m] = low.repeat(8, 2).repeat(8, 3)
        arr.flush()
        del arr
    manifest.write_text(json.dumps({
        "format": 1, "dataset": "synthetic-celeba-size", "dtype": "uint8", "scale": 255, "item_shape": list(SHAPE),
        "layout": "NCHW", "spatial_dims": 2, "shapes": {k: [v, *SHAPE] for k, v in counts.items()},
        "counts": counts, "binarize": "none"}))
    return counts


def make_checkpoint(root: Path) -> Path:
    import torch
    import yaml

    from vaeflow import checkpoint as ckpt
    from vaeflow import config as vfconfig
    from vaeflow.models import build_model

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "tests" / "configs" / "tiny.yaml").read_text())
    cfg["model"] = MODEL
    cfg["data"].update({"image_size": 64, "channels": 3})
    cfg = vfconfig.validate(cfg)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg["model"])
    path = root / "vae_warmup" / "best.pt"
    ckpt.save({"format": ckpt.FORMAT, "config": cfg, "stage": "vae_warmup", "stage_index": 0,
               "model": model.state_dict(), "ema": model.state_dict(), "epoch": 0, "global_step": 0}, path)
    return path


def make_inception(root: Path) -> Path:
    import torch
    import torchvision

    path = root / "untrained-inception.pth"
    if not path.exists():
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
        torch.save(net.state_dict(), path)
    return path


def child_evaluate(root: Path, args) -> dict:
    os.environ["VAEFLOW_LPIPS_RANDOM_BACKBONE"] = "1"
    os.environ["VAEFLOW_FID_RANDOM_WEIGHTS"] = "1"
    from vaeflow.evaluate import evaluate_checkpoint

    cfg = {"iw_samples": args.iw_samples, "nll_max_images": args.nll_images, "fid_images": args.fid_images,
           "fid_weights": str(root / "untrained-inception.pth")}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = evaluate_checkpoint(root / "vae_warmup" / "best.pt", root / "data", eval_cfg=cfg, log=lambda s: None)
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb()),
            "test_images": m["test_images"], "pca": {k: m["pca"][k] for k in ("fit_images", "of_images", "method")},
            "lpips_images": m["test_images"], "rfid_images": m["rfid"].get("protocol", {}).get("images"),
            "nll_images": m["nll"]["images"], "iw_samples": m["nll"]["iw_samples"], "eval_seconds": m["seconds"]}


def child_baseline(root: Path, args) -> dict:
    """The previous implementation, verbatim in effect: every train image as float32, sklearn full SVD."""
    import torch
    from sklearn.decomposition import PCA

    from vaeflow.data import PreparedDataset

    n = args.baseline_images
    train, test = PreparedDataset(root / "data", "train"), PreparedDataset(root / "data", "test")
    t0 = time.perf_counter()
    rows = lambda ds, a, b: torch.stack(ds.__getitems__(list(range(a, b)))).flatten(1).numpy()  # noqa: E731
    x = np.concatenate([rows(train, s, min(n, s + 1024)) for s in range(0, n, 1024)])
    y = rows(test, 0, min(1000, len(test)))
    t1 = time.perf_counter()
    pca = PCA(n_components=256, svd_solver="full").fit(x)
    t_fit = time.perf_counter() - t1
    np.clip(pca.inverse_transform(pca.transform(y)), 0, 1)
    return {"seconds": round(time.perf_counter() - t0, 1), "fit_seconds": round(t_fit, 1),
            "peak_rss_mb": round(peak_rss_mb()), "train_images": n}


def baseline_at_full_size(n_small: int, seconds_small: float) -> dict:
    """Memory and time of the old baseline on the whole train split, from what it allocates:
    the float32 train matrix, scikit-learn's centered copy and U of the SVD (N x min(N, D)),
    plus the float32 test matrix; the fit's time scaled by N*D*min(N, D)."""
    n, d, t = COUNTS["train"], int(np.prod(SHAPE)), COUNTS["test"]
    gb = (3 * n * d * 4 + t * d * 4) / 1e9
    scale = (n * d * min(n, d)) / (n_small * d * min(n_small, d))
    return {"min_memory_gb": round(gb, 1), "seconds_estimate": round(seconds_small * scale)}


def run_child(phase: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", phase, "--work", str(args.work), "--iw-samples", str(args.iw_samples),
           "--nll-images", str(args.nll_images), "--fid-images", str(args.fid_images),
           "--baseline-images", str(args.baseline_images)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/vaeflow-bench-eval"))
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the CelebA split sizes (quick checks)")
    ap.add_argument("--iw-samples", type=int, default=16)
    ap.add_argument("--nll-images", type=int, default=1000)
    ap.add_argument("--fid-images", type=int, default=200)
    ap.add_argument("--baseline-images", type=int, default=4000)
    ap.add_argument("--keep", action="store_true", help="keep the 2.5 GB synthetic dataset")
    ap.add_argument("--child", choices=["evaluate", "baseline"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = child_evaluate if args.child == "evaluate" else child_baseline
        print(json.dumps(fn(args.work, args)))
        return
    t0 = time.perf_counter()
    counts = make_data(args.work, args.scale)
    make_checkpoint(args.work)
    make_inception(args.work)
    print(f"synthetic prepared set {counts} of {SHAPE} uint8 in {args.work} ({time.perf_counter() - t0:.0f} s); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    new = run_child("evaluate", args)
    print(f"vaeflow evaluate: peak RSS {new['peak_rss_mb']} MB, {new['seconds']} s; {json.dumps(new)}")
    old = run_child("baseline", args)
    full = baseline_at_full_size(old["train_images"], old["fit_seconds"])
    print(f"old PCA baseline on {old['train_images']} train images: peak RSS {old['peak_rss_mb']} MB, "
          f"{old['seconds']} s ({old['fit_seconds']} s fit); on all {COUNTS['train']:,}: >= {full['min_memory_gb']} GB "
          f"(float32 data + centered copy + SVD U + test), ~{full['seconds_estimate']} s SVD (extrapolated, not run)")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
