"""Does bf16 autocast pay on this CPU, model by model? The measurement behind `use_amp: auto`.

    python benchmarks/bench_bf16_cpu.py [--steps 12] [--rounds 2] [--threads 2] [--only LABEL]

Models: the default 16 px digits model (base_ch 16), the earlier default (base_ch 32) at 16 px
and at 32 px, and the CelebA preset's 64 px model (CT's 256 px model is left out: 11 s a step in fp32; measured once at 2.52x). One train
step (forward with a sampled posterior, MSE + 1e-6 KL, backward, AdamW) is timed in fp32 (the
baseline) and under bf16 autocast, each in a process of its own, the two alternating, --rounds
processes each: median step of a process, fastest process. (Interleaved in one process, fp32
steps ran 1.7x slower at 16 px than alone, which flatters bf16.) Prints forward GFLOP per
image, both step times, the bf16/fp32 speedup and what `use_amp: auto`
(vaeflow.trainer.precision.choose_precision) picks for that model on this processor, so the
policy's threshold can be checked against the measured crossover.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

from vaeflow.models import build_model
from vaeflow.trainer.precision import CPU_BF16_MIN_GFLOP, choose_precision, cpu_features, forward_gflop_per_image

REPO = Path(__file__).resolve().parent.parent


def preset_model(name: str, **over) -> dict:
    return {**yaml.safe_load((REPO / "config" / name).read_text())["model"], **over}


# (label, model section, batch size): batch sizes as the presets train.
CASES = [
    ("default 16 px (config.yaml)", preset_model("config.yaml"), 16),
    ("base_ch 32 at 16 px (the earlier default)", preset_model("config.yaml", base_ch=32), 32),
    ("base_ch 32 at 32 px", preset_model("config.yaml", base_ch=32, resolution=32), 32),
    ("celeba 64 px (celeba.yaml)", preset_model("celeba.yaml"), 16),
]


def step_fn(model, x, dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model.ae_forward(x, sample_posterior=True)
            loss = (out.recon.float() - x).pow(2).mean() + 1e-6 * out.posterior.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_one(case: int, dtype: str, steps: int, threads: int) -> dict:
    """One process's measurement: median train-step seconds after a warm-up."""
    torch.set_num_threads(threads)
    _, mcfg, batch = CASES[case]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(mcfg)
    x = torch.rand(batch, mcfg["in_channels"], mcfg["resolution"], mcfg["resolution"]) * 2 - 1
    step = step_fn(model, x, torch.bfloat16 if dtype == "bf16" else None)
    step()  # warm-up: oneDNN primitive creation
    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    gflop = forward_gflop_per_image(model, x)
    auto = choose_precision("auto", "bf16", torch.device("cpu"), model, x[:1]).name
    return {"s": sorted(times)[len(times) // 2], "gflop": gflop, "auto": auto}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps per process (median taken)")
    p.add_argument("--rounds", type=int, default=2, help="processes per variant (fastest taken)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="run only cases whose label contains this")
    p.add_argument("--child", nargs=2, metavar=("CASE", "DTYPE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(time_one(int(a.child[0]), a.child[1], a.steps, a.threads)))
        return
    print(f"CPU: {cpu_features().describe()}; {a.threads} threads; "
          f"auto's threshold {CPU_BF16_MIN_GFLOP:g} GFLOP/image")
    rows = []
    for i, (label, _, batch) in enumerate(CASES):
        if a.only and a.only not in label:
            continue
        best = {}
        for _ in range(a.rounds):
            for dtype in ("fp32", "bf16"):
                out = subprocess.run([sys.executable, __file__, "--child", str(i), dtype, "--steps", str(a.steps),
                                      "--threads", str(a.threads)], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if dtype not in best or r["s"] < best[dtype]["s"]:
                    best[dtype] = r
        fp32, bf16 = best["fp32"]["s"], best["bf16"]["s"]
        rows.append((label, batch, best["fp32"]["gflop"], fp32, bf16, best["fp32"]["auto"]))
        print(f"{label}: batch {batch}, {rows[-1][2]:.2f} GFLOP/img, fp32 {fp32 * 1e3:.0f} ms, "
              f"bf16 {bf16 * 1e3:.0f} ms, bf16 speedup {fp32 / bf16:.2f}x, auto -> {rows[-1][5]}", flush=True)
    print("\n| model | batch | fwd GFLOP/img | fp32 ms/step | bf16 ms/step | bf16 vs fp32 | auto picks |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, batch, gflop, fp32, bf16, auto in rows:
        print(f"| {label} | {batch} | {gflop:.2f} | {fp32 * 1e3:.0f} | {bf16 * 1e3:.0f} | {fp32 / bf16:.2f}x | {auto} |")


if __name__ == "__main__":
    main()
