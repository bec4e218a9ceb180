"""Which arithmetic a stage trains in: fp32, bf16 autocast, or fp16 autocast + GradScaler.

`training.pipeline.steps[i].use_amp` (per stage):

    auto   (default) bf16 autocast where it is fast, else fp32:
           CUDA: bf16 when the GPU supports it;
           CPU:  bf16 when the processor has native bf16 (AVX512-BF16 or AMX) *and* the
                 model's forward pass is at least CPU_BF16_MIN_GFLOP per image; smaller
                 models stay fp32: casts and small kernels eat the gain. Measured on a
                 2-core AVX512-BF16 CPU (benchmarks/bench_bf16_cpu.py): the default 16 px
                 model (0.03 GFLOP per image) 0.78x, the digits model with base_ch 32
                 (0.10) 0.97x at 16 px and 1.16x at 32 px (0.42), the CelebA preset
                 (13.9) 1.87x, CT's 256 px model (223) 2.52x. On a 2-core Zen 5
                 EPYC (full-width AVX512) bf16 gains more at the small end: the default
                 1.04-1.10x, base_ch 32 at 16 px 1.26-1.94x, at 32 px 1.50x, CelebA
                 1.87x; the threshold keeps fp32 where some bf16 CPUs lose. Without
                 native bf16 the CPU emulates it, several times slower (a 2-core AVX2
                 CPU: the default model 0.30x, base_ch 32 0.14x), so fp32;
           other devices (MPS): fp32.
    bf16   bf16 autocast on any device (on a CPU without native bf16: emulated, slower).
    fp16   fp16 autocast + GradScaler on CUDA; elsewhere fp32 (said in the log).
    fp32 / false   fp32.
    true   AMP in `amp_dtype` (bf16 or fp16) where the hardware has it, else fp32.

The choice depends only on the config, the device and the processor's features (never on a
timing), so a run repeats exactly on the same machine. `Precision.describe()` is the log line.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

# Below this many forward GFLOP per image, `use_amp: auto` keeps a bf16-capable CPU in fp32:
# between the measured no-gain and first-gain points (the module docstring).
CPU_BF16_MIN_GFLOP = 0.25
CPUINFO = Path("/proc/cpuinfo")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bf16 arithmetic


@dataclass(frozen=True)
class CpuFeatures:
    bf16_flags: tuple[str, ...]  # native bf16 features found (empty: none)
    capability: str  # torch's vectorisation level (AVX2, AVX512, ...)
    source: str  # where the flags came from

    @property
    def native_bf16(self) -> bool:
        return bool(self.bf16_flags)

    def describe(self) -> str:
        found = ", ".join(self.bf16_flags) if self.bf16_flags else f"neither {' nor '.join(_BF16_FLAGS)}"
        return f"{found} ({self.source}; torch CPU capability {self.capability})"


def _cpuinfo_flags(path: Path = CPUINFO) -> set[str] | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@lru_cache(maxsize=None)
def cpu_features() -> CpuFeatures:
    """Native bf16 support of this processor: /proc/cpuinfo flags on Linux, else torch's
    cpuinfo probes (`torch.cpu._is_avx512_bf16_supported`, `_is_amx_tile_supported`)."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpuinfo_flags()
    if flags is not None:
        return CpuFeatures(tuple(f for f in _BF16_FLAGS if f in flags), capability, str(CPUINFO))
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    found = tuple(f for f, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)())
    return CpuFeatures(found, capability, "torch.cpu probes")


def forward_gflop_per_image(model: torch.nn.Module, sample: torch.Tensor) -> float:
    """Forward FLOPs of one image, in GFLOP: its convolutions, linear layers and attention
    matmuls, counted by forward hooks (2 FLOPs a multiply-add, as torch.utils.flop_counter
    counts them). Not FlopCounterMode itself: its first use imports torch._dynamo, about
    1.3 CPU-s at every stage start; the norms and activations it would add are a few %."""
    from vaeflow.models.blocks import AttnBlock

    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
            per_input = module.out_channels // module.groups * math.prod(module.kernel_size)
            total += 2 * inputs[0].numel() * per_input
        elif isinstance(module, torch.nn.modules.conv._ConvNd):
            total += 2 * output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, torch.nn.Linear):
            total += 2 * output.numel() * module.in_features
        elif isinstance(module, AttnBlock):  # q k v and proj_out (1x1 weights, run as F.linear) + QK^T, AV
            b, c, n = output.shape[0], output.shape[1], output[0, 0].numel()
            total += 2 * b * n * c * c * 4 + 2 * b * n * n * c * 2

    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear, AttnBlock)
    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, kinds)]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model.ae_forward(sample[:1], sample_posterior=False)
    finally:
        for m, training in modes:
            m.training = training
        for h in handles:
            h.remove()
    return total / 1e9


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32" | "bf16" | "fp16"
    device_type: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for plain fp32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Enabled only for fp16 (on CUDA); a disabled scaler is a no-op with a state_dict."""
        return torch.amp.GradScaler("cuda", enabled=self.name == "fp16")

    def describe(self) -> str:
        what = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + GradScaler"}[self.name]
        return f"Precision: {what} on {self.device_type} ({self.reason})"


def choose_precision(use_amp, amp_dtype: str, device: torch.device, model=None, sample=None,
                     cpu: CpuFeatures | None = None) -> Precision:
    """The stage's precision; `model` and one `sample` batch are needed only to size a model
    for `auto` on a bf16-capable CPU (its forward FLOPs are counted once). `cpu` defaults to
    this processor's `cpu_features()`."""
    dev = device.type
    cpu = cpu or cpu_features()
    mode = {True: "on", False: "fp32"}.get(use_amp, use_amp)
    if mode == "fp32":
        return Precision("fp32", dev, f"use_amp: {use_amp}")
    if mode == "fp16" or (mode == "on" and amp_dtype == "fp16"):
        if dev == "cuda":
            return Precision("fp16", dev, f"use_amp: {use_amp}, amp_dtype: fp16" if mode == "on" else "use_amp: fp16")
        return Precision("fp32", dev, f"use_amp asks for fp16, which is CUDA-only here; {dev} trains in fp32")
    if mode == "bf16":
        note = ""
        if dev == "cpu" and not cpu.native_bf16:
            note = f"; this CPU has {cpu.describe()}: bf16 is emulated and slower than fp32"
        return Precision("bf16", dev, "use_amp: bf16" + note)
    return _auto_or_on(mode, dev, model, sample, cpu)


def _auto_or_on(mode: str, dev: str, model, sample, feats: CpuFeatures) -> Precision:
    label = "use_amp: auto" if mode == "auto" else "use_amp: true"
    if dev == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", dev, f"{label}: this GPU has bf16")
        return Precision("fp32", dev, f"{label}: this GPU has no bf16 (use_amp: fp16 turns on fp16 + GradScaler)")
    if dev != "cpu":
        return Precision("fp32", dev, f"{label}: autocast is used on cuda and cpu only")
    if not feats.native_bf16:
        return Precision("fp32", dev, f"{label}: this CPU has {feats.describe()}, so bf16 would be "
                                      "emulated and slower than fp32")
    if mode == "on":
        return Precision("bf16", dev, f"{label}: this CPU has {feats.describe()}")
    gflop = forward_gflop_per_image(model, sample) if model is not None and sample is not None else math.inf
    if gflop < CPU_BF16_MIN_GFLOP:
        return Precision("fp32", dev, f"{label}: this CPU has {feats.describe()}, but the model's forward pass is "
                                      f"{gflop:.2f} GFLOP per image, under the {CPU_BF16_MIN_GFLOP:g} GFLOP where "
                                      "bf16 autocast pays on a CPU (benchmarks/bench_bf16_cpu.py; "
                                      "use_amp: bf16 forces it)")
    return Precision("bf16", dev, f"{label}: this CPU has {feats.describe()}; forward pass "
                                  f"{gflop:.1f} GFLOP per image >= {CPU_BF16_MIN_GFLOP:g}")
