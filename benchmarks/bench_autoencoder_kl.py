"""Train-step benchmark: vaeflow's AutoencoderKL against diffusers' AutoencoderKL.

Both models hold the same weights (ours is built from the diffusers model with
`vaeflow.interop.diffusers.from_diffusers`), see the same batch, run with the same thread count,
and their steps are interleaved in one process (round robin, so load changes hit every variant
alike). A train step is forward (sampled posterior) + MSE + 1e-6 * KL, backward, Adam step.

Variants: diffusers fp32 (the baseline), ours fp32, ours fp32 channels_last, ours bf16
autocast + channels_last, and with --compile the same under torch.compile. For each it prints
the median step time, the speed-up over diffusers fp32, and achieved FLOP/s (counted with
torch.utils.flop_counter) against the machine's measured matmul peak.

A quality check then trains diffusers fp32 and ours bf16 (channels_last) from the same weights
on the same synthetic batches for --quality-steps steps and compares the held-out PSNR (fp32
eval); the target is |delta| <= 0.2 dB.

    PYTHONPATH=src python benchmarks/bench_autoencoder_kl.py            # ~2-3 min on 2 cores
    PYTHONPATH=src python benchmarks/bench_autoencoder_kl.py --quick    # ~1 min smoke run
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
import warnings
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 64x64 images, 3 timed steps, 6 quality steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--channels", default="64,128,256,256", help="block_out_channels")
    p.add_argument("--layers", type=int, default=2, help="layers_per_block")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--compile", action="store_true", help="also time torch.compile variants")
    p.add_argument("--diffusers-bf16", action="store_true",
                   help="also time diffusers with bf16 autocast + channels_last")
    p.add_argument("--quality-steps", type=int, default=12, help="0 skips the PSNR check")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting and peak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fused-adam", action="store_true",
                   help="Adam(fused=True) for every variant (default: torch's default Adam)")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.quality_steps = min(a.steps, 3), min(a.warmup, 1), min(a.quality_steps, 6)
        a.size = min(a.size, 64)
    return a


# ------------------------------------------------------------------------------------------
# data and models

def synthetic_images(n, size, seed):
    """Smooth colour fields plus a few hard-edged discs, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 8, 8, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    for i in range(n):
        for _ in range(3):
            cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([1.6, 1.6, 0.3]) +
                         torch.tensor([-0.8, -0.8, 0.1])).tolist()
            col = torch.rand(3, 1, 1, generator=g) * 2 - 1
            m = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
            x[i] = torch.where(m, col.expand(3, size, size), x[i])
    return torch.tanh(x)


def build_pair(args):
    import diffusers

    from vaeflow.interop.diffusers import from_diffusers

    chans = tuple(int(c) for c in args.channels.split(","))
    torch.manual_seed(args.seed)
    dm = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=chans,
        down_block_types=("DownEncoderBlock2D",) * len(chans),
        up_block_types=("UpDecoderBlock2D",) * len(chans), layers_per_block=args.layers,
        latent_channels=4, norm_num_groups=32, sample_size=args.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = from_diffusers(dm)
    return dm, ours


class Variant:
    def __init__(self, name, model, kind, *, channels_last=False, bf16=False, compile=False,
                 lr=2e-4, fused=False):
        self.name, self.kind = name, kind
        self.channels_last, self.bf16 = channels_last, bf16
        model = copy.deepcopy(model).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True if fused else None)
        self.fwd = self._forward_ours if kind == "ours" else self._forward_diffusers
        if compile:
            self.fwd = torch.compile(self.fwd)
        self.times: list[float] = []

    def _forward_ours(self, x):
        recon, post = self.model(x, sample_posterior=True)
        return recon, post.kl()

    def _forward_diffusers(self, x):
        post = self.model.encode(x).latent_dist
        recon = self.model.decode(post.sample()).sample
        return recon, post.kl()

    def prep(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def step(self, x):
        x = self.prep(x)
        self.opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with ctx:
            recon, kl = self.fwd(x)
            loss = F.mse_loss(recon.float(), x) + 1e-6 * kl.float().mean()
        loss.backward()
        self.opt.step()
        return loss.item()

    @torch.no_grad()
    def psnr(self, x):
        self.model.eval()
        x = self.prep(x)
        if self.kind == "ours":
            recon = self.model(x, sample_posterior=False)[0]
        else:
            recon = self.model(x, sample_posterior=False).sample
        self.model.train()
        mse = F.mse_loss(recon.float(), x).item()
        return 10 * math.log10(4.0 / max(mse, 1e-12))  # data range [-1, 1]


# ------------------------------------------------------------------------------------------
# measurements

def matmul_peak(dtype, n=2048, reps=5):
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def count_flops(variant, x):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        variant.step(x)
    return fc.get_total_flops()


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}x3x{args.size}x{args.size}, block_out_channels ({args.channels}), "
          f"layers_per_block {args.layers}", flush=True)
    import diffusers
    print(f"diffusers {diffusers.__version__}", flush=True)
    dm, ours = build_pair(args)
    print(f"params: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M", flush=True)

    opt = dict(lr=args.lr, fused=args.fused_adam)
    variants = [Variant("diffusers fp32", dm, "diffusers", **opt),
                Variant("ours fp32", ours, "ours", **opt),
                Variant("ours fp32 channels_last", ours, "ours", channels_last=True, **opt),
                Variant("ours bf16", ours, "ours", bf16=True, **opt),
                Variant("ours bf16 channels_last", ours, "ours", channels_last=True, bf16=True,
                        **opt)]
    if args.diffusers_bf16:
        variants.append(Variant("diffusers bf16 channels_last", dm, "diffusers",
                                channels_last=True, bf16=True, **opt))
    if args.compile:
        variants += [Variant("ours fp32 channels_last compile", ours, "ours", channels_last=True,
                             compile=True, **opt),
                     Variant("ours bf16 channels_last compile", ours, "ours", channels_last=True,
                             bf16=True, compile=True, **opt)]

    x = synthetic_images(args.batch, args.size, args.seed)
    for v in variants:  # warm-up (and compilation) outside the timed loop
        t = time.perf_counter()
        for _ in range(args.warmup):
            v.step(x)
        print(f"  warm-up {v.name}: {time.perf_counter() - t:.1f} s", flush=True)
    for i in range(args.steps):  # interleaved: one step of every variant per round
        order = variants if i % 2 == 0 else variants[::-1]
        for v in order:
            t = time.perf_counter()
            v.step(x)
            v.times.append(time.perf_counter() - t)
    base = statistics.median(variants[0].times)

    flops = None
    if not args.no_flops:
        flops = count_flops(Variant("flops", ours, "ours"), x)
        peak32 = matmul_peak(torch.float32)
        peak16 = matmul_peak(torch.bfloat16)
        print(f"\ntrain step: {flops / 1e9:.1f} GFLOP (torch.utils.flop_counter); matmul peak "
              f"fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s "
              f"({args.threads} threads)")

    print(f"\n{'variant':36s} {'median s':>9s} {'min s':>7s} {'speed-up':>9s} {'(median)':>9s}"
          + ("" if flops is None else f" {'GFLOP/s':>8s} {'% peak':>7s}"))
    base_min = min(variants[0].times)
    for v in variants:
        med = statistics.median(v.times)
        line = (f"{v.name:36s} {med:9.3f} {min(v.times):7.3f} {base_min / min(v.times):8.2f}x "
                f"{base / med:8.2f}x")
        if flops is not None:
            peak = peak16 if v.bf16 else peak32
            fast = min(v.times)
            line += f" {flops / fast / 1e9:8.1f} {100 * flops / fast / peak:6.1f}%"
        print(line)
    print("(speed-up = diffusers fp32 time / variant time from each variant's fastest step; "
          "other processes only ever slow a step down, so the minimum is the robust estimate on "
          "a shared machine; (median) for comparison. GFLOP/s and % of the fp32 or bf16 matmul "
          "peak use the fastest step.)")

    def ratio(v):
        return base_min / min(v.times)

    fp32 = [v for v in variants if v.kind == "ours" and not v.bf16]
    bf16 = [v for v in variants if v.kind == "ours" and v.bf16]
    r_plain = ratio(variants[1])
    best32 = max(fp32, key=ratio)
    best16 = max(bf16, key=ratio)
    print(f"\nours fp32 vs diffusers fp32 (same graph): {r_plain:.2f}x "
          f"({'ok' if r_plain >= 0.97 else 'SLOWER'}; target: never slower, 3% noise allowed)")
    print(f"best fp32 ({best32.name}): {ratio(best32):.2f}x")
    print(f"best bf16 ({best16.name}): {ratio(best16):.2f}x "
          f"(target >= 1.4x: {'ok' if ratio(best16) >= 1.4 else 'MISSED'})", flush=True)

    if args.quality_steps > 0:
        print(f"\nquality: {args.quality_steps} train steps from the same weights, same batches")
        ref = Variant("diffusers fp32", dm, "diffusers", **opt)
        fast = Variant(best16.name, ours, "ours", channels_last=best16.channels_last, bf16=True,
                       **opt)
        held = synthetic_images(args.batch, args.size, args.seed + 1000)
        p0 = ref.psnr(held), fast.psnr(held)
        for s in range(args.quality_steps):
            xb = synthetic_images(args.batch, args.size, args.seed + 1 + s)
            for v in (ref, fast):
                torch.manual_seed(10_000 + s)  # same posterior noise for both
                v.step(xb)
        p1 = ref.psnr(held), fast.psnr(held)
        d = p1[1] - p1[0]
        print(f"  held-out PSNR before: diffusers fp32 {p0[0]:.2f} dB, {fast.name} {p0[1]:.2f} dB")
        print(f"  held-out PSNR after:  diffusers fp32 {p1[0]:.2f} dB, {fast.name} {p1[1]:.2f} dB "
              f"(delta {d:+.2f} dB; target |delta| <= 0.2: {'ok' if abs(d) <= 0.2 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
