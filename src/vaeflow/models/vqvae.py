"""VQ-VAE on the SD/LDM encoder-decoder backbone (taming-transformers' VQModel layout).

    x -> Encoder -> quant_conv -> quantize (codebook) -> post_quant_conv -> Decoder

The backbone options are AutoencoderKL's; the quantizer is a `VectorQuantizer` with
`codebook_size` codes of dimension `embed_dim`, commitment weight `beta` (on the encoder term),
EMA codebook updates (`ema`, `decay`) and dead-code restart (`dead_code_threshold`). Gradients
reach the encoder straight through the quantizer. `ae_forward` returns the codebook +
commitment term as `reg_loss` and the batch's `perplexity` and codebook `usage` in `stats`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .base import AEOutput, Autoencoder, load_weights, set_memory_format
from .blocks import Decoder, Encoder, conv_nd, default_norm_groups, resolve_channels, spatial_size
from .quantizers import VectorQuantizer


class VQVAE(Autoencoder):
    """Vector-quantised autoencoder (2D or 3D)."""

    causal_default = False

    def __init__(self, *, in_channels: int = 3, out_channels: int | None = None,
                 resolution: int | Sequence[int] = 256, base_ch: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 4, 4), down_channels: Sequence[int] | None = None,
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (),
                 z_channels: int | None = None, embed_dim: int = 4, norm_groups: int | None = None,
                 dropout: float = 0.0, mid_attn: bool = True, tanh_out: bool = False,
                 spatial_dims: int = 2, causal: bool | None = None, act: str = "silu",
                 codebook_size: int = 1024, beta: float = 0.25, ema: bool = True,
                 decay: float = 0.99, dead_code_threshold: float = 1.0, channels_last: bool = False,
                 ckpt_path: str | None = None, **quantizer_kwargs: Any):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        out_channels = in_channels if out_channels is None else out_channels
        causal = self.causal_default if causal is None else bool(causal)
        self.quantize = self._make_quantizer(codebook_size=codebook_size, embed_dim=embed_dim,
                                             beta=beta, ema=ema, decay=decay,
                                             dead_code_threshold=dead_code_threshold,
                                             **quantizer_kwargs)
        embed_dim = self.quantize.code_dim
        z_channels = embed_dim if z_channels is None else z_channels
        channels, stem = resolve_channels(base_ch, ch_mult, down_channels)
        if norm_groups is None:
            norm_groups = default_norm_groups([stem, *channels])
        self.spatial_dims = spatial_dims
        self.causal = causal
        self.resolution = spatial_size(resolution, spatial_dims)
        self.channels = tuple(channels)
        self.embed_dim = embed_dim
        common = dict(channels=channels, num_res_blocks=num_res_blocks, z_channels=z_channels,
                      attn_resolutions=tuple(attn_resolutions), resolution=min(self.resolution),
                      norm_groups=norm_groups, dropout=dropout, mid_attn=mid_attn,
                      dims=spatial_dims, causal=causal, act=act)
        self.encoder = Encoder(in_channels=in_channels, stem_channels=stem, double_z=False, **common)
        self.decoder = Decoder(out_channels=out_channels, tanh_out=tanh_out, **common)
        self.quant_conv = conv_nd(spatial_dims, z_channels, embed_dim, 1)
        self.post_quant_conv = conv_nd(spatial_dims, embed_dim, z_channels, 1)
        self.config = dict(in_channels=in_channels, out_channels=out_channels, resolution=resolution,
                           base_ch=base_ch, ch_mult=tuple(ch_mult), down_channels=down_channels,
                           num_res_blocks=num_res_blocks, attn_resolutions=tuple(attn_resolutions),
                           z_channels=z_channels, embed_dim=embed_dim, norm_groups=norm_groups,
                           dropout=dropout, mid_attn=mid_attn, tanh_out=tanh_out,
                           spatial_dims=spatial_dims, causal=causal, act=act,
                           codebook_size=self.quantize.codebook_size, channels_last=channels_last,
                           **quantizer_kwargs)
        self.memory_format = set_memory_format(self, channels_last, spatial_dims)
        load_weights(self, ckpt_path)

    def _make_quantizer(self, *, codebook_size, embed_dim, beta, ema, decay, dead_code_threshold,
                        **extra) -> nn.Module:
        if extra:
            raise ValueError(f"unknown model option(s) {sorted(extra)} for VQVAE")
        return VectorQuantizer(codebook_size, embed_dim, beta=beta, ema=ema, decay=decay,
                               dead_code_threshold=dead_code_threshold)

    # -- taming-style API ---------------------------------------------------------------------
    def encode(self, x: torch.Tensor):
        """-> (quantized latent, reg_loss, info with `indices` and stats)."""
        h = self.encoder(x.contiguous(memory_format=self.memory_format))
        return self.quantize(self.quant_conv(h))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        z_q = z_q.contiguous(memory_format=self.memory_format)
        return self.decoder(self.post_quant_conv(z_q))

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantize.codes_to_latent(indices))

    def forward(self, x: torch.Tensor):
        """-> (recon, reg_loss, info)."""
        z_q, loss, info = self.encode(x)
        return self.decode(z_q), loss, info

    # -- vaeflow autoencoder contract ---------------------------------------------------------
    def ae_forward(self, x: torch.Tensor, sample_posterior: bool = True) -> AEOutput:
        recon, loss, info = self(x)
        stats = {k: v for k, v in info.items() if isinstance(v, float)}
        return AEOutput(recon=recon, posterior=None, reg_loss=loss, stats=stats)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        sizes = list(self.resolution)
        for _ in range(len(self.channels) - 1):  # Downsample: floor(r / 2); causal depth: ceil
            sizes = [(-(-r // 2) if (i == 0 and self.causal and self.spatial_dims == 3) else r // 2)
                     for i, r in enumerate(sizes)]
        return (self.embed_dim, *sizes)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Codes drawn uniformly from the codebook (VQ models have no learned prior here)."""
        device = self.quant_conv.weight.device
        spatial = self.latent_shape[1:]
        idx = torch.randint(0, self.quantize.codebook_size, (n, *spatial), generator=generator,
                            device="cpu" if generator is None or generator.device.type == "cpu"
                            else generator.device).to(device)
        return self.quantize.codes_to_latent(idx).to(self.quant_conv.weight.dtype)

    def parts(self) -> dict[str, list[nn.Module]]:
        return {"encoder": [self.encoder, self.quant_conv],
                "decoder": [self.post_quant_conv, self.decoder],
                "quantizer": [self.quantize]}

    def last_layer_weight(self) -> torch.Tensor:
        return self.decoder.conv_out.weight
