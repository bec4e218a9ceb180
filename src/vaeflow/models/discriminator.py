"""PatchGAN discriminator (pix2pix / taming `NLayerDiscriminator`) in 2D and 3D.

`norm` picks the normalisation: "batch" (taming's default), "group", "instance" or "none".
BatchNorm mixes samples in a batch, which breaks a per-sample R1 gradient penalty, so
`build_discriminator` refuses norm="batch" together with an R1 weight.
"""
from __future__ import annotations

from torch import nn

from .blocks import conv_nd, default_norm_groups

NORMS = ("batch", "group", "instance", "none")


def _norm(kind: str, channels: int, dims: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "group":
        return nn.GroupNorm(default_norm_groups([channels]), channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"discriminator norm must be one of {NORMS}, got {kind!r}")


class NLayerDiscriminator(nn.Module):
    """conv4/s2 + LeakyReLU, then (n_layers - 1) conv4/s2 + norm + LeakyReLU blocks with
    widths ndf * min(2**n, 8), one conv4/s1 block, and a conv4/s1 to one logit per patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3,
                 norm: str = "batch", spatial_dims: int = 2):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"discriminator norm must be one of {NORMS}, got {norm!r}")
        dims = spatial_dims
        use_bias = norm != "batch"
        kw, padw = 4, 1
        seq: list[nn.Module] = [conv_nd(dims, in_channels, ndf, kw, 2, padw),
                                nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [conv_nd(dims, ndf * prev, ndf * mult, kw, 2, padw, bias=use_bias),
                    _norm(norm, ndf * mult, dims), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [conv_nd(dims, ndf * prev, ndf * mult, kw, 1, padw, bias=use_bias),
                _norm(norm, ndf * mult, dims), nn.LeakyReLU(0.2, True),
                conv_nd(dims, ndf * mult, 1, kw, 1, padw)]
        self.main = nn.Sequential(*seq)
        self.apply(_weights_init)

    def forward(self, x):
        return self.main(x)


def _weights_init(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Conv3d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm,
                        nn.InstanceNorm2d, nn.InstanceNorm3d)) and m.weight is not None:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


R1_KEYS = ("r1_weight", "r1_gamma", "r1")


def build_discriminator(cfg: dict | None, in_channels: int, spatial_dims: int = 2) -> NLayerDiscriminator:
    """Build the PatchGAN from a discriminator config section.

    Keys: `ndf` (64), `n_layers` (3), `norm` ("batch"|"group"|"instance"|"none"; default
    "batch", or "group" when an R1 weight (`r1_weight`/`r1_gamma`/`r1`) > 0 is set). Other keys
    (loss weights, start steps, ...) are ignored.
    """
    cfg = dict(cfg or {})
    r1 = max(float(cfg.get(k) or 0.0) for k in R1_KEYS)
    norm = cfg.get("norm")
    if norm is None:
        norm = "group" if r1 > 0 else "batch"
    if norm == "batch" and r1 > 0:
        raise ValueError("discriminator norm 'batch' cannot be combined with an R1 penalty; "
                         "use 'group', 'instance' or 'none'")
    return NLayerDiscriminator(in_channels=in_channels, ndf=int(cfg.get("ndf", 64)),
                               n_layers=int(cfg.get("n_layers", 3)), norm=norm,
                               spatial_dims=spatial_dims)
