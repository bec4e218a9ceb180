"""The decoder fine-tune recipe (config/sd_decoder_finetune.yaml) on the real SD kl-f8 architecture.

Writes a diffusers folder holding a randomly initialised SD kl-f8 AutoencoderKL (diffusers'
config of SD 1.x/2.x VAEs: 128-256-512-512, 2 ResBlocks per level, 4 latent channels; offline:
no Hub weights), a folder of synthetic 256 px RGB images, and runs both stages of the preset
through the trainer (`run_stage`, what `vaeflow train` runs) for a few steps each, with
model.ckpt_path pointing at the folder. Reports per stage the step time (median of the
intervals between consecutive log lines, the first step excluded), the peak memory (CUDA:
torch.cuda.max_memory_allocated; CPU: the process's peak RSS), and checks that the encoder and
quant_conv weights are bit-identical to the source's after the stages.

LPIPS runs with a random AlexNet backbone when its weights are not on disk (the same compute).

    python benchmarks/bench_sd_decoder_finetune.py                   # CPU: batch 1, 3 steps per stage
    python benchmarks/bench_sd_decoder_finetune.py --device cuda --batch 8 --steps 10
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SD_KL_F8 = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu", norm_num_groups=32, sample_size=256,
                scaling_factor=0.18215)


def make_images(root: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):  # smooth colour fields plus noise: something to reconstruct
        f = rng.uniform(1, 6, 3)
        img = np.stack([np.sin(2 * np.pi * (f[c] * xx + rng.uniform()) + f[(c + 1) % 3] * yy) for c in range(3)], -1)
        img = (img * 0.4 + 0.5 + rng.normal(0, 0.05, img.shape)).clip(0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(root / f"{i:03d}.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per stage")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
            / "alexnet-owt-7be5be79.pth").exists():
        os.environ["VAEFLOW_LPIPS_RANDOM_BACKBONE"] = "1"
    import diffusers

    from vaeflow import config as cfg
    from vaeflow.data import prepare_dataset
    from vaeflow.models.loading import load_autoencoder
    from vaeflow.preflight import check_code_level
    from vaeflow.trainer import run_stage

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="sd_ft_bench_"))
    torch.manual_seed(0)
    src = diffusers.AutoencoderKL(**{**SD_KL_F8, "sample_size": args.size})
    src.save_pretrained(work / "sd-vae")
    n_params = sum(p.numel() for p in src.parameters())
    del src
    make_images(work / "images", args.images, args.size)
    raw = yaml.safe_load((REPO / "config" / "sd_decoder_finetune.yaml").read_text())
    raw["data"].update(root=str(work / "images"), image_size=args.size, split={"val": 0.1, "test": 0.1})
    raw["model"].update(ckpt_path=str(work / "sd-vae"), resolution=args.size)
    raw["training"].update(batch_size=args.batch, device=args.device, log_every=1, save_every=10_000,
                           sample_every_epoch=False, cpu_threads=args.threads)
    raw["training"]["pipeline"]["defaults"]["max_steps"] = args.steps  # per epoch
    for step in raw["training"]["pipeline"]["steps"]:
        step["n_epochs"] = 1
    config = cfg.validate(raw)
    check_code_level(config)
    results = work / "results"
    prepare_dataset(config["data"], results / "data")
    rows = []
    for stage in cfg.stage_names(config):
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run_stage(config, stage, results)
        wall = time.perf_counter() - t0
        logs = [json.loads(line) for line in (results / stage / "metrics.jsonl").read_text().splitlines()]
        stamps = [datetime.fromisoformat(r["timestamp"]).timestamp() for r in logs if r["split"] == "train"]
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        peak = (torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        rows.append((stage, statistics.median(steps) if steps else float("nan"), peak, wall))
    model, state = load_autoencoder(results / cfg.stage_names(config)[-1] / "best.pt")
    ref = {k: v for k, v in load_autoencoder_source(work / "sd-vae").items()}
    frozen = [k for k in ref if k.startswith(("encoder.", "quant_conv."))]
    same = all(torch.equal(model.state_dict()[k], ref[k]) for k in frozen)
    print(f"\nSD kl-f8 ({n_params / 1e6:.1f} M parameters, random weights), {args.size} px, batch {args.batch}, "
          f"{args.steps} steps per stage, device {args.device}, torch {torch.__version__}, {args.threads} CPU threads")
    print(f"provenance init: {state['provenance'].get('init', {}).get('kind')} sha256 {state['provenance'].get('init', {}).get('sha256', '')[:12]}")
    print(f"encoder + quant_conv bit-identical to the source after both stages: {same}")
    print("| stage | step time (s, median) | peak memory (GiB" + (", CUDA allocated" if args.device.startswith("cuda") else ", process RSS") + ") | stage wall (s) |")
    print("| --- | --- | --- | --- |")
    for stage, step, peak, wall in rows:
        print(f"| {stage} | {step:.2f} | {peak:.2f} | {wall:.1f} |")
    return 0 if same else 1


def load_autoencoder_source(folder: Path) -> dict:
    from vaeflow.interop.diffusers import from_diffusers

    return from_diffusers(folder).state_dict()


if __name__ == "__main__":
    sys.exit(main())
