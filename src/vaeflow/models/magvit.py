"""MAGVIT-style VQ-VAE: the LDM backbone with a lookup-free (LFQ, MAGVIT-v2) or finite scalar
(FSQ) quantizer, and causal 3D convolutions (depth/time axis) for volumes.

    quantizer: lfq  codebook_size = 2**bits (code dim = bits), beta (commitment),
                    entropy_weight (0.1), diversity_gamma (1.0), inv_temperature (100)
    quantizer: fsq  levels (8, 5, 5, 5) -> codebook of prod(levels), code dim len(levels)

With `spatial_dims=3` the convolutions are causal along depth (`causal`, default True):
output slice t depends only on input slices <= t, and the attention is masked the same way
(GroupNorm still pools over the whole volume).
"""
from __future__ import annotations

import inspect
from typing import Sequence

from torch import nn

from .quantizers import FSQ, LFQ
from .vqvae import VQVAE


class MagvitVQVAE(VQVAE):
    causal_default = True

    def __init__(self, *, quantizer: str = "lfq", codebook_size: int = 2 ** 10,
                 levels: Sequence[int] = (8, 5, 5, 5), entropy_weight: float = 0.1,
                 diversity_gamma: float = 1.0, inv_temperature: float = 100.0,
                 beta: float = 0.25, embed_dim: int | None = None, causal: bool | None = None,
                 spatial_dims: int = 2, **backbone):
        if quantizer not in ("lfq", "fsq"):
            raise ValueError(f"magvit quantizer must be 'lfq' or 'fsq', got {quantizer!r}")
        allowed = set(inspect.signature(VQVAE.__init__).parameters) - {
            "self", "quantizer_kwargs", "ema", "decay", "dead_code_threshold"}
        unknown = sorted(set(backbone) - allowed)
        if unknown:
            raise ValueError(f"unknown model option(s) {unknown} for magvit; valid: "
                             f"{sorted(allowed | set(inspect.signature(type(self).__init__).parameters) - {'self', 'backbone'})}")
        qkw = dict(quantizer=quantizer, entropy_weight=entropy_weight,
                   diversity_gamma=diversity_gamma, inv_temperature=inv_temperature)
        if quantizer == "fsq":
            qkw["levels"] = tuple(int(x) for x in levels)
        if causal is None:
            causal = spatial_dims == 3
        self._embed_dim_request = embed_dim
        super().__init__(codebook_size=codebook_size, beta=beta, embed_dim=embed_dim or 0,
                         causal=causal, spatial_dims=spatial_dims, **backbone, **qkw)

    def _make_quantizer(self, *, codebook_size, embed_dim, beta, ema, decay, dead_code_threshold,
                        quantizer, entropy_weight, diversity_gamma, inv_temperature,
                        levels=(8, 5, 5, 5)) -> nn.Module:
        if quantizer == "lfq":
            q = LFQ(codebook_size, beta=beta, entropy_weight=entropy_weight,
                    diversity_gamma=diversity_gamma, inv_temperature=inv_temperature)
        else:
            q = FSQ(levels)
        if self._embed_dim_request not in (None, 0, q.code_dim):
            raise ValueError(f"{quantizer} fixes the code dimension to {q.code_dim}; "
                             f"embed_dim={self._embed_dim_request} does not match")
        return q
