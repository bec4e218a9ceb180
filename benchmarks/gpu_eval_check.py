"""Real-GPU check of evaluation and sampling: everything runs on CUDA, without device errors,
and gives the CPU's numbers.

Prepares the digits data, saves an untrained tiny AutoencoderKL (tests/configs/tiny.yaml),
then runs `evaluate_checkpoint` and `sample_run` on `cuda` and on `cpu`, with LPIPS on a
random backbone and rFID on an untrained InceptionV3 (the test-only opt-ins, so that both
networks run on the GPU too; their numbers mean nothing). Exits 1 on any difference beyond
float tolerance, 2 without CUDA.

    python benchmarks/gpu_eval_check.py [--work /tmp/vaeflow-gpu-check]

The same checks run as `python -m pytest -m gpu tests/evaluation/test_gpu.py`.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def setup(work: Path) -> Path:
    """results/ with prepared digits, an untrained tiny checkpoint and an untrained Inception file."""
    import torchvision
    import yaml

    from vaeflow import checkpoint as ckpt
    from vaeflow import config as vfconfig
    from vaeflow.data import prepare_dataset
    from vaeflow.models import build_model

    cfg = vfconfig.validate(yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text()))
    results = work / "results"
    if not (results / "data" / "manifest.json").exists():
        prepare_dataset(cfg["data"], results / "data")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(cfg["model"])
    ckpt.save({"format": ckpt.FORMAT, "config": cfg, "stage": "vae_warmup", "stage_index": 0,
               "model": model.state_dict(), "ema": model.state_dict(), "epoch": 0, "global_step": 0},
              results / "vae_warmup" / "best.pt")
    inception = work / "untrained-inception.pth"
    if not inception.exists():
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
        torch.save(net.state_dict(), inception)
    return results


def differences(a, b, path="", rel=1e-3, skip=("device", "seconds", "checkpoint")) -> list[str]:
    """Leaves of two metrics dicts that differ beyond float tolerance (GPU kernels differ in the last bits)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}: keys {sorted(set(a) ^ set(b))}"] if a.keys() != b.keys() else []
        return out + [d for k in a.keys() & b.keys() if k not in skip for d in differences(a[k], b[k], f"{path}.{k}", rel)]
    if isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=rel, abs_tol=1e-6) else [f"{path}: cpu {a} vs cuda {b}"]
    return [] if a == b else [f"{path}: cpu {a!r} vs cuda {b!r}"]


def run(work: Path, fid_images: int = 64) -> list[str]:
    import os

    os.environ["VAEFLOW_LPIPS_RANDOM_BACKBONE"] = "1"
    os.environ["VAEFLOW_FID_RANDOM_WEIGHTS"] = "1"
    from vaeflow.evaluate import evaluate_checkpoint
    from vaeflow.sample import sample_run

    results = setup(work)
    cfg = {"iw_samples": 8, "fid_images": fid_images, "fid_weights": str(work / "untrained-inception.pth")}
    metrics = {}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)  # the same random LPIPS backbone on both
        metrics[dev] = evaluate_checkpoint(results / "vae_warmup" / "best.pt", results / "data", eval_cfg=cfg,
                                           device=dev, log=lambda s: None)
        shutil.rmtree(results / "vae_warmup" / "samples", ignore_errors=True)
        written = sample_run(results, "vae_warmup", samples=16, device=dev)
        print(f"{dev}: evaluated on {metrics[dev]['device']} in {metrics[dev]['seconds']} s; {len(written)} sample files")
    problems = [] if metrics["cuda"]["device"].startswith("cuda") else [f"ran on {metrics['cuda']['device']}"]
    for key in ("lpips", "rfid"):
        if not metrics["cuda"][key].get("available"):
            problems.append(f"{key} did not run on cuda: {metrics['cuda'][key].get('reason')}")
    return problems + differences(metrics["cpu"], metrics["cuda"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/vaeflow-gpu-check"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing checked")
        return 2
    problems = run(args.work)
    for p in problems:
        print("FAIL", p)
    print("OK: evaluation and sampling ran on CUDA and match the CPU" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
