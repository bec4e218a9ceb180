"""Building blocks of the SD/LDM encoder and decoder, for 2D and 3D.

Parameter names follow LDM/CompVis (`norm1`, `conv1`, `nin_shortcut`, `q`/`k`/`v`/`proj_out`,
`downsample.conv`, ...) so original LDM checkpoints load without renaming; the diffusers
mapping lives in `vaeflow.interop.diffusers`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class CausalConv3d(nn.Conv3d):
    """Conv3d that sees only the current and earlier slices along depth/time (axis 2).

    The depth padding that a symmetric conv would split over both ends all goes in front
    (zeros); height and width are padded symmetrically as usual. Parameter names are those of
    nn.Conv3d, so checkpoints move between causal and plain 3D models.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, **kwargs):
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_channels, out_channels, k, stride, padding=0, **kwargs)
        self.causal_pad = (p[2], p[2], p[1], p[1], 2 * p[0], 0)  # F.pad order: W, H, D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.causal_pad):
            x = F.pad(x, self.causal_pad)
        return super().forward(x)


def conv_nd(dims: int, *args, causal: bool = False, **kwargs) -> nn.Module:
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return (CausalConv3d if causal else nn.Conv3d)(*args, **kwargs)
    raise ValueError(f"spatial_dims must be 2 or 3, got {dims}")


def Normalize(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=eps, affine=True)


def default_norm_groups(channels: Sequence[int], max_groups: int = 32) -> int:
    """Largest group count <= `max_groups` that divides every width in `channels`."""
    g = 0
    for c in channels:
        g = math.gcd(g, int(c))
    for cand in range(min(max_groups, g), 0, -1):
        if g % cand == 0:
            return cand
    return 1


def _memory_format_of(w: torch.Tensor) -> torch.memory_format:
    if w.ndim == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if w.ndim == 5 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "mish": F.mish, "relu": F.relu}


def get_act(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3 -> GroupNorm -> SiLU -> dropout -> conv3, plus a (1x1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int | None = None, *, dims: int = 2,
                 norm_groups: int = 32, dropout: float = 0.0, eps: float = 1e-6,
                 causal: bool = False, act: str = "silu"):
        super().__init__()
        self.act = get_act(act)
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, norm_groups, eps)
        self.conv1 = conv_nd(dims, in_channels, out_channels, 3, 1, 1, causal=causal)
        self.norm2 = Normalize(out_channels, norm_groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv_nd(dims, out_channels, out_channels, 3, 1, 1, causal=causal)
        if in_channels != out_channels:
            self.nin_shortcut = conv_nd(dims, in_channels, out_channels, 1, 1, 0)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        if self.nin_shortcut is not None:
            if self.training:  # as diffusers (DDP stride warning); keeps NHWC for NHWC weights
                x = x.contiguous(memory_format=_memory_format_of(self.nin_shortcut.weight))
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all positions (2D or 3D).

    Weights are LDM's 1x1 convolutions (`q`, `k`, `v`, `proj_out`); the forward pass runs them
    as matmuls on [B, N, C] tokens with `F.scaled_dot_product_attention`, in the same operation
    order and memory layouts as diffusers' `Attention` + `AttnProcessor2_0`, so that the two
    libraries round identically in fp32.
    """

    def __init__(self, channels: int, *, dims: int = 2, norm_groups: int = 32, eps: float = 1e-6,
                 causal: bool = False):
        super().__init__()
        self.channels = channels
        self.causal = causal and dims == 3  # tokens attend only to the same or earlier slices
        self.norm = Normalize(channels, norm_groups, eps)
        self.q = conv_nd(dims, channels, channels, 1)
        self.k = conv_nd(dims, channels, channels, 1)
        self.v = conv_nd(dims, channels, channels, 1)
        self.proj_out = conv_nd(dims, channels, channels, 1)

    def _linear(self, conv: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, conv.weight.view(self.channels, self.channels), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        h = x.flatten(2).transpose(1, 2)  # [B, N, C]
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        q = self._linear(self.q, h).view(b, -1, 1, c).transpose(1, 2)  # [B, 1, N, C]
        k = self._linear(self.k, h).view(b, -1, 1, c).transpose(1, 2)
        v = self._linear(self.v, h).view(b, -1, 1, c).transpose(1, 2)
        mask = None
        if self.causal:
            t = torch.arange(x.shape[2], device=x.device).repeat_interleave(x[0, 0, 0].numel())
            mask = t[:, None] >= t[None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = self._linear(self.proj_out, o.transpose(1, 2).reshape(b, -1, c))
        # (attention + residual) in this order: the sum keeps the attention output's layout
        return o.transpose(-1, -2).reshape(x.shape) + x


class Downsample(nn.Module):
    """Stride-2 3x3 conv after LDM's asymmetric zero pad (0, 1) on every spatial axis
    (causal 3D: the depth axis is padded (2, 0) instead, so no output sees a later slice)."""

    def __init__(self, channels: int, *, dims: int = 2, causal: bool = False):
        super().__init__()
        self.dims = dims
        self.pad = (0, 1) * dims if not (causal and dims == 3) else (0, 1, 0, 1, 2, 0)
        self.conv = conv_nd(dims, channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.pad, mode="constant", value=0.0)
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int, *, dims: int = 2, causal: bool = False):
        super().__init__()
        self.conv = conv_nd(dims, channels, channels, 3, 1, 1, causal=causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def resolve_channels(base_ch: int, ch_mult: Sequence[int], down_channels: Sequence[int] | None):
    """Stage widths and stem width. Explicit `down_channels` win (stem = down_channels[0], as in
    diffusers' `block_out_channels`); otherwise widths are base_ch * mult and the stem is base_ch."""
    if down_channels:
        chans = [int(c) for c in down_channels]
        return chans, chans[0]
    return [int(base_ch * m) for m in ch_mult], int(base_ch)


def spatial_size(resolution, dims: int) -> tuple[int, ...]:
    if isinstance(resolution, int):
        return (resolution,) * dims
    res = tuple(int(r) for r in resolution)
    if len(res) != dims:
        raise ValueError(f"resolution {resolution} does not have {dims} entries")
    return res


class Encoder(nn.Module):
    """LDM encoder: stem, `len(channels)` stages of `num_res_blocks` ResBlocks (+ attention where
    the running resolution is in `attn_resolutions`) with a Downsample between stages, a
    ResBlock-Attention-ResBlock middle, and a GroupNorm -> SiLU -> conv head."""

    def __init__(self, *, in_channels: int, channels: Sequence[int], stem_channels: int,
                 num_res_blocks: int, z_channels: int, double_z: bool = True,
                 attn_resolutions: Sequence[int] = (), resolution: int = 256,
                 norm_groups: int = 32, dropout: float = 0.0, mid_attn: bool = True, dims: int = 2,
                 causal: bool = False, act: str = "silu"):
        super().__init__()
        kw = dict(dims=dims, norm_groups=norm_groups, causal=causal)
        rkw = dict(kw, act=act)
        self.num_resolutions = len(channels)
        self.num_res_blocks = num_res_blocks
        self.conv_in = conv_nd(dims, in_channels, stem_channels, 3, 1, 1, causal=causal)
        curr_res = resolution
        block_in = stem_channels
        self.down = nn.ModuleList()
        for i_level, block_out in enumerate(channels):
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, dropout=dropout, **rkw))
                block_in = block_out
                if curr_res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in, **kw))
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, dims=dims, causal=causal)
                curr_res = curr_res // 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout, **rkw)
        self.mid.attn_1 = AttnBlock(block_in, **kw) if mid_attn else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout, **rkw)
        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = conv_nd(dims, block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1,
                                causal=causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for i_block, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """LDM decoder: conv_in to the deepest width, ResBlock-Attention-ResBlock middle, then the
    stages in reverse with `num_res_blocks + 1` ResBlocks each and an Upsample between stages,
    then GroupNorm -> SiLU -> conv (-> tanh).

    `self.up[i]` is the stage at resolution level `i` (LDM order), so `self.up` runs from the
    last entry to the first; diffusers stores the same stages as `up_blocks[n - 1 - i]`."""

    def __init__(self, *, out_channels: int, channels: Sequence[int], num_res_blocks: int,
                 z_channels: int, attn_resolutions: Sequence[int] = (), resolution: int = 256,
                 norm_groups: int = 32, dropout: float = 0.0, mid_attn: bool = True,
                 tanh_out: bool = False, dims: int = 2, causal: bool = False, act: str = "silu"):
        super().__init__()
        kw = dict(dims=dims, norm_groups=norm_groups, causal=causal)
        rkw = dict(kw, act=act)
        self.num_resolutions = len(channels)
        self.num_res_blocks = num_res_blocks
        self.tanh_out = tanh_out
        block_in = channels[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = conv_nd(dims, z_channels, block_in, 3, 1, 1, causal=causal)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout=dropout, **rkw)
        self.mid.attn_1 = AttnBlock(block_in, **kw) if mid_attn else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout=dropout, **rkw)
        ups = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = channels[i_level]
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, dropout=dropout, **rkw))
                block_in = block_out
                if curr_res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in, **kw))
            if i_level != 0:
                up.upsample = Upsample(block_in, dims=dims, causal=causal)
                curr_res = curr_res * 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = conv_nd(dims, block_in, out_channels, 3, 1, 1, causal=causal)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
