"""SD/LDM-style `AutoencoderKL` (2D images or 3D volumes).

    x -> Encoder -> quant_conv -> DiagonalGaussian(mean, logvar) -> z -> post_quant_conv -> Decoder

Defaults are the Stable Diffusion VAE: resolution 256, base_ch 128, ch_mult (1, 2, 4, 4),
embed_dim 4 -> 4x32x32 latents. Parameter names follow LDM/CompVis, so LDM checkpoints
(`first_stage_model.*` or bare `encoder.*`/`decoder.*` keys) load directly through `ckpt_path`;
diffusers weights go through `vaeflow.interop.diffusers`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import AEOutput, Autoencoder, DiagonalGaussian, load_weights, set_memory_format
from .blocks import Decoder, Encoder, conv_nd, default_norm_groups, resolve_channels, spatial_size

LATENT_SCALE = 0.18215


class AutoencoderKL(Autoencoder):
    """KL-regularised autoencoder (SD VAE).

    Args:
        in_channels / out_channels: image channels (out defaults to in).
        resolution: input size (int, or one int per spatial axis); sets `latent_shape` and the
            running resolution that `attn_resolutions` refers to.
        base_ch, ch_mult: stage widths base_ch * mult; or explicit `down_channels`.
        num_res_blocks: ResBlocks per encoder stage (decoder stages get one more).
        attn_resolutions: running resolutions (e.g. 32 for the 32x32 map of a 256 input) that
            get a self-attention block after each ResBlock.
        dec_attn_resolutions: the same for the decoder when it differs (default: attn_resolutions).
        z_channels: encoder output / decoder input width (defaults to embed_dim).
        embed_dim: latent channels after quant_conv.
        double_z: encoder predicts mean and logvar (False: deterministic autoencoder).
        norm_groups: GroupNorm groups (default: largest <= 32 dividing every width).
        mid_attn: attention in the middle blocks; tanh_out: tanh on the output.
        spatial_dims: 2 ([B, C, H, W]) or 3 ([B, C, D, H, W]).
        use_quant_conv / use_post_quant_conv: the 1x1 latent projections (diffusers may drop them).
        post_quant_bias: post_quant_conv has a bias. Without one, a model with z_channels !=
            embed_dim still exports to diffusers exactly (both 1x1 convs fold into their
            neighbours; with a bias the decoder's zero padding would differ at the borders).
        latent_scale, latent_shift: `encode(normalize=True)` returns (z - shift) * scale and
            `decode(denorm=True)` inverts it (SD: scale 0.18215, shift 0).
        act: ResBlock activation ("silu" (SD), "gelu", "mish", "relu"); heads stay SiLU.
        channels_last: keep weights and activations NHWC (NDHWC in 3D); faster fp32 convs on
            CPU and GPU. Numerics differ from NCHW only by rounding.
        ckpt_path: weights to load; without it a warning says the model starts from scratch.
    """

    LATENT_SCALE = LATENT_SCALE

    def __init__(self, *, in_channels: int = 3, out_channels: int | None = None,
                 resolution: int | Sequence[int] = 256, base_ch: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 4, 4), down_channels: Sequence[int] | None = None,
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (),
                 dec_attn_resolutions: Sequence[int] | None = None, z_channels: int | None = None,
                 embed_dim: int = 4, double_z: bool = True,
                 norm_groups: int | None = None, dropout: float = 0.0, mid_attn: bool = True,
                 tanh_out: bool = False, spatial_dims: int = 2, use_quant_conv: bool = True,
                 use_post_quant_conv: bool = True, post_quant_bias: bool = True,
                 latent_scale: float = LATENT_SCALE,
                 latent_shift: float = 0.0, act: str = "silu", channels_last: bool = False,
                 ckpt_path: str | None = None, codebook_size: int | None = None):
        super().__init__()
        del codebook_size  # KL models ignore a codebook size left in the config
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        out_channels = in_channels if out_channels is None else out_channels
        z_channels = embed_dim if z_channels is None else z_channels
        channels, stem = resolve_channels(base_ch, ch_mult, down_channels)
        if norm_groups is None:
            norm_groups = default_norm_groups([stem, *channels])
        for c in (stem, *channels):
            if c % norm_groups:
                raise ValueError(f"norm_groups={norm_groups} does not divide width {c}")
        self.spatial_dims = spatial_dims
        self.resolution = spatial_size(resolution, spatial_dims)
        self.embed_dim = embed_dim
        self.z_channels = z_channels
        self.double_z = double_z
        self.latent_scale = float(latent_scale)
        self.latent_shift = float(latent_shift or 0.0)
        self.channels = tuple(channels)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        if dec_attn_resolutions is not None:
            dec_attn_resolutions = tuple(int(r) for r in dec_attn_resolutions)
        run_res = min(self.resolution)
        common = dict(channels=channels, num_res_blocks=num_res_blocks, z_channels=z_channels,
                      resolution=run_res, norm_groups=norm_groups, dropout=dropout,
                      mid_attn=mid_attn, dims=spatial_dims, act=act)
        self.encoder = Encoder(in_channels=in_channels, stem_channels=stem, double_z=double_z,
                               attn_resolutions=attn_resolutions, **common)
        self.decoder = Decoder(out_channels=out_channels, tanh_out=tanh_out,
                               attn_resolutions=attn_resolutions if dec_attn_resolutions is None
                               else dec_attn_resolutions, **common)
        zc = 2 * z_channels if double_z else z_channels
        ec = 2 * embed_dim if double_z else embed_dim
        if use_quant_conv:
            self.quant_conv = conv_nd(spatial_dims, zc, ec, 1)
        elif zc != ec:
            raise ValueError("use_quant_conv=False needs z_channels == embed_dim")
        else:
            self.quant_conv = nn.Identity()
        if use_post_quant_conv:
            self.post_quant_conv = conv_nd(spatial_dims, embed_dim, z_channels, 1, bias=post_quant_bias)
        elif embed_dim != z_channels:
            raise ValueError("use_post_quant_conv=False needs z_channels == embed_dim")
        else:
            self.post_quant_conv = nn.Identity()
        self.config = dict(in_channels=in_channels, out_channels=out_channels,
                           resolution=resolution, base_ch=base_ch, ch_mult=tuple(ch_mult),
                           down_channels=None if down_channels is None else tuple(down_channels),
                           num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                           dec_attn_resolutions=dec_attn_resolutions,
                           z_channels=z_channels, embed_dim=embed_dim, double_z=double_z,
                           norm_groups=norm_groups, dropout=dropout, mid_attn=mid_attn,
                           tanh_out=tanh_out, spatial_dims=spatial_dims,
                           use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv,
                           post_quant_bias=post_quant_bias, latent_scale=latent_scale, latent_shift=latent_shift, act=act,
                           channels_last=channels_last)
        self.memory_format = set_memory_format(self, channels_last, spatial_dims)
        load_weights(self, ckpt_path)

    # -- SD-style API -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, normalize: bool = False, sample_posterior: bool = False):
        """Posterior q(z|x); with `normalize=True` the latent tensor (mode, or a sample when
        `sample_posterior`) times `latent_scale`, ready for a diffusion model."""
        moments = self.quant_conv(self.encoder(x.contiguous(memory_format=self.memory_format)))
        if self.double_z:
            posterior = DiagonalGaussian(moments)
        else:
            posterior = DiagonalGaussian(mean=moments, logvar=torch.zeros_like(moments),
                                         deterministic=True)
        if not normalize:
            return posterior
        z = posterior.sample() if sample_posterior else posterior.mode()
        return (z - self.latent_shift) * self.latent_scale

    def decode(self, z: torch.Tensor, denorm: bool = False) -> torch.Tensor:
        """Reconstruction from a latent; `denorm=True` first undoes `encode(normalize=True)`."""
        if denorm:
            z = z / self.latent_scale + self.latent_shift
        z = z.contiguous(memory_format=self.memory_format)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    # -- vaeflow autoencoder contract (CONTRIBUTING.md) ----------------------------------------
    def ae_forward(self, x: torch.Tensor, sample_posterior: bool = True) -> AEOutput:
        recon, posterior = self(x, sample_posterior=sample_posterior)
        return AEOutput(recon=recon, posterior=posterior, reg_loss=None, stats={})

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x).mode()

    @property
    def latent_shape(self) -> tuple[int, ...]:
        f = 2 ** (len(self.channels) - 1)
        return (self.embed_dim, *(r // f for r in self.resolution))

    def parts(self) -> dict[str, list[nn.Module]]:
        return {"encoder": [self.encoder, self.quant_conv],
                "decoder": [self.post_quant_conv, self.decoder],
                "quantizer": []}

    def last_layer_weight(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

