"""Structural checks of the model and discriminator against the data, at validate time.

A model that cannot process the configured images (no resolution levels, an image size
the downsampling does not divide, latents smaller than a pixel, a PatchGAN deeper than
the image) fails deep inside torch with a traceback. Here the sizes are checked by
arithmetic and the model is built on the "meta" device (shapes only: no memory), so each
such error is one `ConfigError` naming the key to change. (A meta-device forward would
be more general but imports torch._dynamo: seconds at every Snakefile start.)
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from vaeflow.config import ConfigError, resolve_steps

# Keys whose value sets how many modules are built: bounded so a typo cannot hang the build.
MAX_LEVELS = 12  # entries of ch_mult / down_channels / hidden_dims
MAX_BLOCKS = 32  # num_res_blocks
MAX_INT = 1 << 20  # any other integer model option (widths, codebook sizes, resolutions)
MAX_ELEMENTS = 1 << 32  # parameters + buffers of the model (16 GiB in fp32)
BACKBONE_TYPES = ("autoencoder_kl", "vqvae", "magvit")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_options(mcfg: dict) -> None:
    """Counts and sizes of the model section, before anything is built."""
    for key, value in mcfg.items():
        where = f"model.{key}"
        if key in ("ch_mult", "down_channels", "hidden_dims"):
            if value is None and key == "down_channels":
                continue
            if not isinstance(value, (list, tuple)) or not value:
                raise ConfigError(where, f"must be a non-empty list of positive integers (one entry per resolution level), got {value!r}")
            if len(value) > MAX_LEVELS:
                raise ConfigError(where, f"{len(value)} levels; at most {MAX_LEVELS}")
            if not all(_is_int(v) and 1 <= v <= MAX_INT for v in value):
                raise ConfigError(where, f"entries must be integers in 1..{MAX_INT}, got {value!r}")
        elif key == "num_res_blocks" and _is_int(value) and not 0 <= value <= MAX_BLOCKS:
            raise ConfigError(where, f"must be in 0..{MAX_BLOCKS}, got {value}")
        elif _is_int(value) and not -MAX_INT <= value <= MAX_INT:
            raise ConfigError(where, f"{value} is out of range (|value| <= {MAX_INT})")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(where, f"must be a finite number, got {value}")
        elif isinstance(value, (list, tuple)) and any(_is_int(v) and abs(v) > MAX_INT for v in value):
            raise ConfigError(where, f"entries must be at most {MAX_INT} in size, got {value!r}")


def input_shape(config: dict) -> tuple[int, ...] | None:
    """(C, [D,] H, W) of one prepared item, or None when the data's size is only known after prepare."""
    from vaeflow.data import DataError, resolve_data_cfg
    from vaeflow.data.sources import get_source

    try:
        data = resolve_data_cfg(config["data"])
        size = data["image_size"] or getattr(get_source(data["dataset"]), "native_size", None)
    except DataError as exc:
        raise ConfigError("data", str(exc)) from None
    if size is None:
        return None
    if data["spatial_dims"] == 3:
        return (data["channels"], data["ct"]["volume_depth"], size, size)
    return (data["channels"], size, size)


def _check_downsampling(mcfg: dict, shape: tuple[int, ...]) -> None:
    """Encoder/decoder backbones halve every spatial axis once per level after the first."""
    if mcfg.get("type") not in BACKBONE_TYPES:
        return
    levels = mcfg.get("down_channels") or mcfg.get("ch_mult") or (1, 2, 4, 4)
    n_down = len(levels) - 1
    factor = 2 ** n_down
    key = "model.down_channels" if mcfg.get("down_channels") else "model.ch_mult"
    for size in shape[1:]:
        if size < factor:
            raise ConfigError(key, f"{n_down} downsamplings ({len(levels)} levels) shrink a {size}-pixel axis below "
                                   f"1 pixel of latent: use at most {int(math.log2(size)) + 1} levels or larger images (data.image_size)")
        if size % factor:
            raise ConfigError(key, f"{n_down} downsamplings ({len(levels)} levels) need image sides divisible by {factor}; "
                                   f"the data gives {'x'.join(map(str, shape[1:]))}: change data.image_size or the number of levels")


def _conv_out(module: torch.nn.Module, sizes: list[int]) -> list[int]:
    """Spatial sizes after a plain conv stack (what a PatchGAN is), or ValueError when a
    kernel no longer fits; other layers keep the size."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            out = []
            for s, k, st, p, d in zip(sizes, m.kernel_size, m.stride, m.padding, m.dilation):
                span = d * (k - 1) + 1
                if s + 2 * p < span:
                    raise ValueError(f"a {s}-pixel axis is smaller than the {k}-wide kernel of a later layer")
                out.append((s + 2 * p - span) // st + 1)
            sizes = out
    return sizes


def _check_resolution(mcfg: dict, shape: tuple[int, ...]) -> None:
    """The model's declared image size (latent shape, attention levels) must be the data's."""
    for key in ("resolution", "image_size"):
        value = mcfg.get(key)
        if value is None:
            continue
        want = list(shape[1:])
        have = [value] * len(want) if _is_int(value) else list(value) if isinstance(value, (list, tuple)) else None
        if have != want:
            raise ConfigError(f"model.{key}", f"{value!r} but the data's images are {'x'.join(map(str, want))} "
                                              "(data.image_size): set both to the same size")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _numel(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def check_model_fits(config: dict):
    """Raise ConfigError (naming the key) unless the model and discriminator fit the data.

    Returns the model built on the meta device (its `latent_shape` is known)."""
    from vaeflow.models import build_model

    mcfg = config["model"]
    _check_options(mcfg)
    ckpt_path = mcfg.get("ckpt_path")
    if ckpt_path is not None and not isinstance(ckpt_path, str):
        raise ConfigError("model.ckpt_path", f"must be a path or a Hub id, got {ckpt_path!r}")
    shape = input_shape(config)
    if shape is not None:
        _check_downsampling(mcfg, shape)
        for key in ("in_channels",):
            if _is_int(mcfg.get(key)) and mcfg[key] != shape[0]:
                raise ConfigError(f"model.{key}", f"{mcfg[key]} but the data has {shape[0]} channel(s) (data.channels)")
    try:
        with warnings.catch_warnings(), torch.device("meta"):  # "starts from scratch": expected here
            warnings.simplefilter("ignore")
            model = build_model({k: v for k, v in mcfg.items() if k != "ckpt_path"})
    except ConfigError:  # already names its key (e.g. a key the trainer owns)
        raise
    except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError, RuntimeError, OverflowError) as exc:
        raise ConfigError("model", f"cannot build {mcfg.get('type')!r}: {_first_line(exc)}") from None
    if _numel(model) > MAX_ELEMENTS:
        raise ConfigError("model", f"{_numel(model):,} parameters and buffers: more than {MAX_ELEMENTS:,}; use smaller widths")
    if ckpt_path:  # the pretrained source's shapes against the model's, before anything trains
        from vaeflow.models.pretrained import check_source

        check_source(model, ckpt_path)
    if shape is None:
        return model
    _check_resolution(mcfg, shape)
    if any(s["gan_training"] for s in resolve_steps(config)):
        _check_discriminator(config, shape)
    return model


def _check_discriminator(config: dict, shape: tuple[int, ...]) -> None:
    """Kernels, strides and depth do not depend on the width: check a width-1 copy on the CPU
    (its init on the meta device would import torch._dynamo) and scale its size by ndf**2."""
    from vaeflow.models import build_discriminator

    dcfg = dict(config["discriminator"])
    ndf = dcfg.get("ndf", 64)
    try:
        disc = build_discriminator({**dcfg, "ndf": 1}, shape[0], len(shape) - 1)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError("discriminator", _first_line(exc)) from None
    if _numel(disc) * ndf**2 > MAX_ELEMENTS:
        raise ConfigError("discriminator.ndf", f"{ndf} gives about {_numel(disc) * ndf**2:,} parameters: more than {MAX_ELEMENTS:,}")
    try:
        _conv_out(disc, list(shape[1:]))
    except ValueError as exc:
        raise ConfigError("discriminator.n_layers", f"{dcfg.get('n_layers')} layers are too deep for images of "
                                                    f"{'x'.join(map(str, shape[1:]))} ({exc}); use fewer") from None
