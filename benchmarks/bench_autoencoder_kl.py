"""Train-step benchmark of vaeflow's AutoencoderKL (CPU or CUDA), against diffusers when installed.

Both models hold the same weights (ours is built from the diffusers model with
`vaeflow.interop.diffusers.from_diffusers`), see the same batch and run in one process,
interleaved round robin (so load changes hit every variant alike). A train step is forward
(sampled posterior) + MSE + 1e-6 * KL, backward, Adam step.

Variants: diffusers fp32 (the baseline, when diffusers imports), ours fp32 / bf16 autocast, each
NCHW and channels_last, and with --compile (default on CUDA) the same under torch.compile.
Per variant: the fastest and median step time, images/s, achieved FLOP/s (counted with
torch.utils.flop_counter) as a share of the same-dtype matmul peak and as MFU (share of the
bf16 matmul peak), both peaks measured in the same run; on CUDA also the peak memory of a
step (torch.cuda.max_memory_allocated during it, less what other variants hold, plus the
variant's own weights, gradients and optimizer state).

A quality check then trains the baseline (fp32) and ours bf16 from the same weights on the
same synthetic batches for --quality-steps steps and compares held-out PSNR (target
|delta| <= 0.2 dB). The table comes last.

    python benchmarks/bench_autoencoder_kl.py                  # CPU, 128 px, batch 4: ~3 min on 2 cores
    python benchmarks/bench_autoencoder_kl.py --quick          # CPU smoke run, ~1 min
    python benchmarks/bench_autoencoder_kl.py --device cuda    # GPU: 256 px, batch 8, 8 variants, < 6 min on an H100
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
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (5 CPU, 10 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (1 CPU, 2 CUDA)")
    p.add_argument("--quick", action="store_true", help="smoke run: 64x64 images, 3 timed steps, 6 quality steps")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--batch", type=int, default=None, help="images per step (4 CPU, 8 CUDA)")
    p.add_argument("--size", type=int, default=None, help="image side (128 CPU, 256 CUDA)")
    p.add_argument("--channels", default="64,128,256,256", help="block_out_channels")
    p.add_argument("--layers", type=int, default=2, help="layers_per_block")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile variants (default: on for CUDA, off for CPU)")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="no further torch.compile variant is started once the run has taken this long")
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers baseline even if installed")
    p.add_argument("--diffusers-bf16", action="store_true", help="also time diffusers bf16 channels_last")
    p.add_argument("--quality-steps", type=int, default=12, help="0 skips the PSNR check")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting and the matmul peaks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=None,
                   help="Adam(fused=True) for every variant (default: on for CUDA)")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    for key, cpu_value, cuda_value in (("steps", 5, 10), ("warmup", 1, 2), ("batch", 4, 8), ("size", 128, 256),
                                       ("compile", False, True), ("fused_adam", False, True)):
        if getattr(a, key) is None:
            setattr(a, key, cuda_value if cuda else cpu_value)
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


def diffusers_config(args) -> dict:
    chans = tuple(int(c) for c in args.channels.split(","))
    return dict(in_channels=3, out_channels=3, block_out_channels=chans,
                down_block_types=("DownEncoderBlock2D",) * len(chans),
                up_block_types=("UpDecoderBlock2D",) * len(chans), layers_per_block=args.layers,
                latent_channels=4, norm_num_groups=32, sample_size=args.size)


def build_models(args):
    """(diffusers model or None, ours with the same weights, why there is no diffusers model)."""
    from vaeflow.interop.diffusers import config_from_diffusers, from_diffusers
    from vaeflow.models import AutoencoderKL

    torch.manual_seed(args.seed)
    why = "--no-diffusers" if args.no_diffusers else None
    if why is None:
        try:
            import diffusers
        except ImportError as exc:
            why = f"diffusers is not importable ({exc})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if why is not None:
            return None, AutoencoderKL(**config_from_diffusers(diffusers_config(args))), why
        dm = diffusers.AutoencoderKL(**diffusers_config(args))
        return dm, from_diffusers(dm), None


class Variant:
    def __init__(self, name, model, kind, device, *, channels_last=False, bf16=False, compile=False,
                 lr=2e-4, fused=False):
        self.name, self.kind, self.device = name, kind, device
        self.channels_last, self.bf16, self.compiled = channels_last, bf16, compile
        model = copy.deepcopy(model).to(device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True if fused else None)
        self.fwd = self._forward_ours if kind == "ours" else self._forward_diffusers
        if compile:
            self.fwd = torch.compile(self.fwd)
        self.times: list[float] = []
        self.peak_bytes: int | None = None
        self.skipped: str | None = None

    def _forward_ours(self, x):
        recon, post = self.model(x, sample_posterior=True)
        return recon, post.kl()

    def _forward_diffusers(self, x):
        post = self.model.encode(x).latent_dist
        recon = self.model.decode(post.sample()).sample
        return recon, post.kl()

    def prep(self, x):
        x = x.to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def step(self, x):
        x = self.prep(x)
        self.opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with ctx:
            recon, kl = self.fwd(x)
            loss = F.mse_loss(recon.float(), x) + 1e-6 * kl.float().mean()
        loss.backward()
        self.opt.step()
        return loss

    def resident_bytes(self) -> int:
        """Weights, gradients and optimizer state of this variant."""
        tensors = [p for p in self.model.parameters()] + [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors if t.device.type == self.device.type)

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

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(v: Variant, x, measure_memory: bool) -> float:
    cuda = v.device.type == "cuda"
    if cuda and measure_memory:
        sync(v.device)
        before = torch.cuda.memory_allocated(v.device)
        torch.cuda.reset_peak_memory_stats(v.device)
    sync(v.device)
    t = time.perf_counter()
    v.step(x)
    sync(v.device)
    dt = time.perf_counter() - t
    if cuda and measure_memory:  # the step's own peak, plus this variant's resident state
        v.peak_bytes = torch.cuda.max_memory_allocated(v.device) - before + v.resident_bytes()
    return dt


def matmul_peak(dtype, device, n_max=None, reps=None, enough_s=0.05):
    """Best matmul FLOP/s in `dtype`: square matrices, doubled from 256 up to n_max until one
    product takes `enough_s`. A fixed 2048 took 57 s a product in bf16 on a CPU without native
    bf16 (emulated at 0.3 GFLOP/s: 6 min for the peak alone); where the dtype is fast, the
    size still reaches n_max (2048 on CPU at 90 GFLOP/s, 8192 on CUDA)."""
    cuda = device.type == "cuda"
    n_max = n_max or (8192 if cuda else 2048)
    reps = reps or (20 if cuda else 5)
    n = 256
    while True:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        torch.mm(a, b)  # untimed: the first product pays for library start-up (cuBLAS handle, oneDNN)
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if n >= n_max or time.perf_counter() - t >= enough_s:
            break
        n *= 2
    for _ in range(3 if cuda else 0):
        torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def count_flops(model, x, device):
    from torch.utils.flop_counter import FlopCounterMode

    v = Variant("flops", model, "ours", device)
    with FlopCounterMode(display=False) as fc:
        v.step(x)
    del v
    return fc.get_total_flops()


def make_variants(args, dm, ours, device):
    opt = dict(lr=args.lr, fused=args.fused_adam)
    out = []
    if dm is not None:
        out.append(Variant("diffusers fp32", dm, "diffusers", device, **opt))
    for bf16 in (False, True):
        for cl in (False, True):
            out.append(Variant(f"ours {'bf16' if bf16 else 'fp32'}{' channels_last' if cl else ''}", ours, "ours",
                               device, channels_last=cl, bf16=bf16, **opt))
    if dm is not None and args.diffusers_bf16:
        out.append(Variant("diffusers bf16 channels_last", dm, "diffusers", device, channels_last=True, bf16=True,
                           **opt))
    if args.compile:  # most useful first: a time budget skips the last ones
        for bf16, cl in ((True, True), (False, True), (True, False), (False, False)):
            out.append(Variant(f"ours {'bf16' if bf16 else 'fp32'}{' channels_last' if cl else ''} compile", ours,
                               "ours", device, channels_last=cl, bf16=bf16, compile=True, **opt))
    return out


def warm_up(variants, x, args, t_start):
    last_compile = 0.0
    for v in variants:
        elapsed = time.perf_counter() - t_start
        if v.compiled and elapsed + last_compile > args.budget_s:
            v.skipped = f"skipped: {elapsed:.0f} s elapsed, --budget-s {args.budget_s:.0f}"
            print(f"  {v.name}: {v.skipped}", flush=True)
            continue
        t = time.perf_counter()
        for _ in range(args.warmup):
            v.step(x)
        sync(v.device)
        took = time.perf_counter() - t
        if v.compiled:
            last_compile = took
        print(f"  warm-up {v.name}: {took:.1f} s", flush=True)
    return [v for v in variants if v.skipped is None]


def run_timed(variants, x, steps):
    for i in range(steps):  # interleaved: one step of every variant per round
        for v in (variants if i % 2 == 0 else variants[::-1]):
            v.times.append(timed_step(v, x, measure_memory=(i == 0)))


def quality_check(args, dm, ours, best16, device):
    print(f"\nquality: {args.quality_steps} train steps from the same weights, same batches")
    opt = dict(lr=args.lr, fused=args.fused_adam)
    ref = Variant("diffusers fp32", dm, "diffusers", device, **opt) if dm is not None else \
        Variant("ours fp32", ours, "ours", device, **opt)
    fast = Variant(best16.name.replace(" compile", ""), ours, "ours", device, channels_last=best16.channels_last,
                   bf16=True, **opt)
    held = synthetic_images(args.batch, args.size, args.seed + 1000)
    p0 = ref.psnr(held), fast.psnr(held)
    for s in range(args.quality_steps):
        xb = synthetic_images(args.batch, args.size, args.seed + 1 + s)
        for v in (ref, fast):
            torch.manual_seed(10_000 + s)  # same posterior noise for both
            v.step(xb)
    p1 = ref.psnr(held), fast.psnr(held)
    d = p1[1] - p1[0]
    print(f"  held-out PSNR before: {ref.name} {p0[0]:.2f} dB, {fast.name} {p0[1]:.2f} dB")
    print(f"  held-out PSNR after:  {ref.name} {p1[0]:.2f} dB, {fast.name} {p1[1]:.2f} dB "
          f"(delta {d:+.2f} dB; target |delta| <= 0.2: {'ok' if abs(d) <= 0.2 else 'MISSED'})", flush=True)


def print_table(variants, args, flops, peaks):
    base = variants[0]
    base_min, base_med = min(base.times), statistics.median(base.times)
    unit, scale = ("TFLOP/s", 1e12) if args.device == "cuda" else ("GFLOP/s", 1e9)
    head = f"{'variant':34s} {'min s':>8s} {'median s':>9s} {'img/s':>8s} {'speed-up':>9s}"
    if flops is not None:
        head += f" {unit:>8s} {'% dtype peak':>12s} {'MFU (bf16)':>10s}"
    if args.device == "cuda":
        head += f" {'peak GiB':>9s}"
    print(f"\n{head}")
    for v in variants:
        fast, med = min(v.times), statistics.median(v.times)
        line = f"{v.name:34s} {fast:8.4f} {med:9.4f} {args.batch / fast:8.1f} {base_min / fast:8.2f}x"
        if flops is not None:
            own = peaks["bf16"] if v.bf16 else peaks["fp32"]
            line += f" {flops / fast / scale:8.1f} {100 * flops / fast / own:11.1f}% {100 * flops / fast / peaks['bf16']:9.1f}%"
        if args.device == "cuda":
            line += f" {v.peak_bytes / 2**30:9.2f}" if v.peak_bytes is not None else f" {'-':>9s}"
        print(line)
    print(f"(speed-up = {base.name} time / variant time, fastest steps; other processes only ever slow a step "
          f"down, so the minimum is the robust estimate on a shared machine (median {base_med:.4f} s for the "
          "baseline). TFLOP/s, % of the same-dtype matmul peak and MFU (% of the bf16 matmul peak) use the "
          "fastest step.)", flush=True)


def describe(args, device, ours, dm, why_no_diffusers):
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        from vaeflow.trainer.precision import cpu_features

        where = f"CPU ({cpu_features().describe()}), {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch}x3x{args.size}x{args.size}, "
          f"block_out_channels ({args.channels}), layers_per_block {args.layers}, "
          f"Adam{' fused' if args.fused_adam else ''}", flush=True)
    print(f"params: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M", flush=True)
    if dm is None:
        print(f"no diffusers baseline: {why_no_diffusers}; speed-ups are against ours fp32", flush=True)
    else:
        import diffusers
        print(f"diffusers {diffusers.__version__}", flush=True)


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available on this machine")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dm, ours, why = build_models(args)
    describe(args, device, ours, dm, why)
    variants = make_variants(args, dm, ours, device)
    x = synthetic_images(args.batch, args.size, args.seed)
    variants = warm_up(variants, x, args, t_start)
    run_timed(variants, x, args.steps)

    flops, peaks = None, {}
    if not args.no_flops:
        flops = count_flops(ours, x, device)
        if device.type == "cuda":  # fp32 convs run as TF32 by default (cudnn.allow_tf32): measure matmul alike
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
        peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
        unit, scale = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
        print(f"\ntrain step: {flops / 1e9:.1f} GFLOP (torch.utils.flop_counter); matmul peak "
              f"fp32{' (TF32)' if device.type == 'cuda' and torch.backends.cudnn.allow_tf32 else ''} "
              f"{peaks['fp32'] / scale:.1f} {unit}, bf16 {peaks['bf16'] / scale:.1f} {unit}", flush=True)

    bf16 = [v for v in variants if v.kind == "ours" and v.bf16]
    if args.quality_steps > 0 and bf16:
        quality_check(args, dm, ours, min(bf16, key=lambda v: min(v.times)), device)
    print_table(variants, args, flops, peaks)
    print(f"total wall time {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
