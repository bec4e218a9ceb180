"""Exact weight interop between `vaeflow.models.AutoencoderKL` and `diffusers.AutoencoderKL`.

    from_diffusers(model_or_path, **overrides) -> vaeflow AutoencoderKL
    to_diffusers(model) -> diffusers.AutoencoderKL
    export_diffusers(checkpoint_path, out_dir) -> out_dir with config.json + safetensors

`from_diffusers` takes a diffusers model, a diffusers model directory (or a pipeline directory
with a `vae/` subfolder), a Hub id (through diffusers, cache only when HF_HUB_OFFLINE=1), a
weights file (.safetensors / .ckpt / .pt / .bin, diffusers or original CompVis/LDM keys, bare or
under `first_stage_model.`), or an in-memory state dict. diffusers itself is imported only by
`to_diffusers` and for Hub ids / model objects; exporting needs only safetensors.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from vaeflow.models.autoencoder_kl import AutoencoderKL
from vaeflow.models.base import clean_state_dict, extract_state_dict
from vaeflow.models.diffusers_keys import diffusers_to_ldm, infer_kl_config, is_diffusers_layout, ldm_to_diffusers

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors", "model.safetensors")


# ---------------------------------------------------------------------------------------------
# configs

def config_from_diffusers(dcfg: dict[str, Any]) -> dict[str, Any]:
    """diffusers AutoencoderKL config -> vaeflow AutoencoderKL keyword arguments."""
    dcfg = dict(dcfg)
    act = dcfg.get("act_fn", "silu")
    if act not in ("silu", "swish", "gelu", "mish", "relu"):
        raise NotImplementedError(f"act_fn={act!r}")
    chans = tuple(int(c) for c in dcfg.get("block_out_channels", (64,)))
    n = len(chans)
    down_types = tuple(dcfg.get("down_block_types", ("DownEncoderBlock2D",) * n))
    up_types = tuple(dcfg.get("up_block_types", ("UpDecoderBlock2D",) * n))
    for t in down_types:
        if t not in ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"):
            raise NotImplementedError(f"down block type {t!r}")
    for t in up_types:
        if t not in ("UpDecoderBlock2D", "AttnUpDecoderBlock2D"):
            raise NotImplementedError(f"up block type {t!r}")
    size = dcfg.get("sample_size", 32)
    res = int(size[0] if isinstance(size, (list, tuple)) else size)
    # attention levels are placed by running resolution; a resolution below 2**(n-1) would
    # make two levels share one value, so pick one that keeps them distinct.
    run = max(res, 2 ** (n - 1))
    enc_attn = tuple(run // 2 ** i for i, t in enumerate(down_types) if t.startswith("Attn"))
    dec_attn = tuple(run // 2 ** (n - 1 - k) for k, t in enumerate(up_types) if t.startswith("Attn"))
    latent = int(dcfg.get("latent_channels", 4))
    cfg = dict(in_channels=int(dcfg.get("in_channels", 3)),
               out_channels=int(dcfg.get("out_channels", 3)),
               resolution=run if isinstance(size, int) or size is None else
               tuple(max(int(s), 2 ** (n - 1)) for s in size),
               down_channels=chans, num_res_blocks=int(dcfg.get("layers_per_block", 1)),
               attn_resolutions=enc_attn, z_channels=latent, embed_dim=latent, double_z=True,
               norm_groups=int(dcfg.get("norm_num_groups", 32)),
               mid_attn=bool(dcfg.get("mid_block_add_attention", True)),
               use_quant_conv=bool(dcfg.get("use_quant_conv", True)),
               use_post_quant_conv=bool(dcfg.get("use_post_quant_conv", True)),
               latent_scale=float(dcfg.get("scaling_factor", 0.18215)),
               latent_shift=float(dcfg.get("shift_factor") or 0.0),
               act="silu" if act == "swish" else act)
    if dec_attn != enc_attn:
        cfg["dec_attn_resolutions"] = dec_attn
    return cfg


def config_to_diffusers(model: AutoencoderKL) -> dict[str, Any]:
    """vaeflow AutoencoderKL -> diffusers AutoencoderKL constructor arguments."""
    c = model.config
    if c["spatial_dims"] != 2:
        raise ValueError("diffusers' AutoencoderKL is 2D; this model has spatial_dims=3")
    if not c["double_z"]:
        raise ValueError("diffusers' AutoencoderKL always has double_z=True")
    folded = c["z_channels"] != c["embed_dim"]
    if folded and not foldable(model):
        raise ValueError("diffusers' AutoencoderKL needs z_channels == embed_dim "
                         f"(got {c['z_channels']} and {c['embed_dim']}) unless post_quant_conv has no bias "
                         "(model.post_quant_bias: false), which lets both 1x1 latent convs fold away exactly")
    if c["tanh_out"]:
        raise ValueError("diffusers' AutoencoderKL has no tanh output")
    chans = list(model.channels)
    if model.encoder.conv_in.out_channels != chans[0]:
        raise ValueError("diffusers' AutoencoderKL needs the stem width to equal the first stage "
                         "width (ch_mult[0] == 1)")
    n = len(chans)
    enc = [len(model.encoder.down[i].attn) > 0 for i in range(n)]
    dec = [len(model.decoder.up[n - 1 - k].attn) > 0 for k in range(n)]
    res = model.resolution
    return dict(in_channels=c["in_channels"], out_channels=c["out_channels"],
                down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in enc],
                up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in dec],
                block_out_channels=chans, layers_per_block=c["num_res_blocks"], act_fn=c["act"],
                latent_channels=c["embed_dim"], norm_num_groups=c["norm_groups"],
                sample_size=res[0] if res[0] == res[1] else list(res),
                scaling_factor=c["latent_scale"],
                shift_factor=c["latent_shift"] if c["latent_shift"] else None,
                use_quant_conv=c["use_quant_conv"] and not folded,
                use_post_quant_conv=c["use_post_quant_conv"] and not folded,
                mid_block_add_attention=c["mid_attn"])


def foldable(model: AutoencoderKL) -> bool:
    """z_channels != embed_dim exports exactly when post_quant_conv is a bias-free 1x1 conv:
    quant_conv (1x1) after the encoder's conv_out is one conv, and so is the decoder's conv_in
    after a bias-free post_quant_conv, zero padding included (P @ 0 = 0). A bias would be seen
    inside the image but not in the padding, so that fold would be wrong at the borders."""
    c = model.config
    return (c["use_quant_conv"] and c["use_post_quant_conv"] and c["spatial_dims"] == 2
            and model.post_quant_conv.bias is None)


def folded_state_dict(model: AutoencoderKL) -> dict[str, torch.Tensor]:
    """`model`'s LDM-named weights, with quant_conv / post_quant_conv folded into the encoder's
    conv_out and the decoder's conv_in when z_channels != embed_dim (see `foldable`); computed
    in float64."""
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    c = model.config
    if c["z_channels"] == c["embed_dim"]:
        return sd
    if not foldable(model):
        raise ValueError("cannot fold quant_conv / post_quant_conv: post_quant_conv has a bias")
    q = sd.pop("quant_conv.weight").double()[:, :, 0, 0]  # [2e, 2z]
    qb = sd.pop("quant_conv.bias").double()
    w, b = sd["encoder.conv_out.weight"].double(), sd["encoder.conv_out.bias"].double()
    dtype = sd["encoder.conv_out.weight"].dtype
    sd["encoder.conv_out.weight"] = torch.einsum("ij,jckl->ickl", q, w).to(dtype)
    sd["encoder.conv_out.bias"] = (q @ b + qb).to(dtype)
    p = sd.pop("post_quant_conv.weight").double()[:, :, 0, 0]  # [z, e]
    wd = sd["decoder.conv_in.weight"].double()  # [C, z, 3, 3]
    sd["decoder.conv_in.weight"] = torch.einsum("ojkl,je->oekl", wd, p).to(dtype)
    return sd


# ---------------------------------------------------------------------------------------------
# loading

def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return extract_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))


def _build(cfg: dict[str, Any], sd: dict[str, torch.Tensor]) -> AutoencoderKL:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*starts from scratch.*")
        model = AutoencoderKL(**cfg)
    model.load_state_dict(sd, strict=True)
    return model


def _ldm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = clean_state_dict(sd, ())
    sd = {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.",
                                                        "post_quant_conv."))}
    if is_diffusers_layout(sd):
        sd = diffusers_to_ldm(sd)
    return sd


def from_state_dict(sd: dict[str, torch.Tensor], config: dict[str, Any] | None = None,
                    **overrides) -> AutoencoderKL:
    """Build from a diffusers- or LDM-named state dict; the config is read from the weights
    unless given (as vaeflow kwargs or a diffusers config with `block_out_channels`)."""
    sd = _ldm_state_dict(sd)
    if config is None:
        cfg = infer_kl_config(sd, resolution=int(overrides.get("resolution", 256)))
    elif "block_out_channels" in config:
        cfg = config_from_diffusers(config)
    else:
        cfg = dict(config)
    cfg.update(overrides)
    return _build(cfg, sd)


def from_diffusers(model_or_path, **overrides) -> AutoencoderKL:
    """vaeflow AutoencoderKL with exactly the weights of a diffusers AutoencoderKL (or of an
    original CompVis/LDM checkpoint). `overrides` replace inferred kwargs (e.g. norm_groups)."""
    if isinstance(model_or_path, dict):
        return from_state_dict(model_or_path, **overrides)
    if isinstance(model_or_path, torch.nn.Module):
        dm = model_or_path
        sd = {k: v.detach().to("cpu", torch.float32) for k, v in dm.state_dict().items()}
        return from_state_dict(sd, config=dict(dm.config), **overrides)
    path = Path(os.fspath(model_or_path))
    if path.is_dir():
        if not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
            path = path / "vae"
        dcfg = json.loads((path / "config.json").read_text())
        for name in WEIGHT_NAMES:
            if (path / name).exists():
                return from_state_dict(_load_file(path / name), config=dcfg, **overrides)
        raise FileNotFoundError(f"no diffusers weights ({', '.join(WEIGHT_NAMES)}) in {path}")
    if path.is_file():
        return from_state_dict(_load_file(path), **overrides)
    # a Hub id: let diffusers resolve it (honours HF_HUB_OFFLINE)
    import diffusers
    sub = {"subfolder": "vae"} if overrides.pop("subfolder_vae", False) else {}
    return from_diffusers(diffusers.AutoencoderKL.from_pretrained(str(model_or_path), **sub),
                          **overrides)


def to_diffusers(model: AutoencoderKL):
    """A diffusers.AutoencoderKL holding exactly `model`'s weights."""
    import diffusers
    dm = diffusers.AutoencoderKL(**config_to_diffusers(model))
    sd = ldm_to_diffusers(folded_state_dict(model))
    dm.load_state_dict(sd, strict=True)
    p = next(model.parameters())
    return dm.to(device=p.device, dtype=p.dtype)


# ---------------------------------------------------------------------------------------------
# export

def _diffusers_version() -> str:
    try:
        from importlib.metadata import version
        return version("diffusers")
    except Exception:  # diffusers not installed: any recent version string will do
        return "0.30.0"


def save_diffusers(model: AutoencoderKL, out_dir) -> Path:
    """Write `model` as a diffusers AutoencoderKL directory (no diffusers import needed)."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dcfg = {"_class_name": "AutoencoderKL", "_diffusers_version": _diffusers_version(),
            **config_to_diffusers(model), "force_upcast": True, "latents_mean": None,
            "latents_std": None}
    sd = {k: v.contiguous() for k, v in ldm_to_diffusers(folded_state_dict(model)).items()}
    tmp = out / "diffusion_pytorch_model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "diffusion_pytorch_model.safetensors")
    (out / "config.json").write_text(json.dumps(dcfg, indent=2) + "\n")
    return out


def load_vaeflow_checkpoint(checkpoint_path, **overrides) -> AutoencoderKL:
    """AutoencoderKL from a vaeflow checkpoint (config + ema/model weights) or from a bare
    LDM/diffusers weights file."""
    path = Path(checkpoint_path)
    if path.suffix == ".safetensors":
        return from_state_dict(_load_file(path), **overrides)
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    cfg = obj.get("config") if isinstance(obj, dict) else None
    sd = extract_state_dict(obj)
    if isinstance(cfg, dict):
        mcfg = dict(cfg.get("model", cfg))
        mtype = str(mcfg.pop("type", "autoencoder_kl"))
        if mtype != "autoencoder_kl":
            raise ValueError(f"only autoencoder_kl models export to diffusers, not {mtype!r}")
        mcfg.pop("ckpt_path", None)
        mcfg = {k: tuple(v) if isinstance(v, list) else v for k, v in mcfg.items()}
        return from_state_dict(sd, config=mcfg, **overrides)
    return from_state_dict(sd, **overrides)


def export_diffusers(checkpoint_path, out_dir, **overrides) -> Path:
    """`vaeflow export-diffusers <checkpoint> <out_dir>`: write config.json and
    diffusion_pytorch_model.safetensors that `diffusers.AutoencoderKL.from_pretrained` loads."""
    return save_diffusers(load_vaeflow_checkpoint(checkpoint_path, **overrides), out_dir)
