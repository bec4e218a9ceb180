"""Key mapping between vaeflow/LDM parameter names and diffusers' `AutoencoderKL` names.

Pure key and shape mapping (torchtitan style): no model and no diffusers import. It lives
with the models so that `AutoencoderKL(ckpt_path=<diffusers weights>)` can use it;
vaeflow.interop.diffusers builds on it.

    LDM / vaeflow                          diffusers
    encoder.down.{i}.block.{j}.*           encoder.down_blocks.{i}.resnets.{j}.*
    encoder.down.{i}.attn.{j}.*            encoder.down_blocks.{i}.attentions.{j}.*
    encoder.down.{i}.downsample.conv       encoder.down_blocks.{i}.downsamplers.0.conv
    decoder.up.{i}.block.{j}.*             decoder.up_blocks.{n-1-i}.resnets.{j}.*   (reversed)
    decoder.up.{i}.upsample.conv           decoder.up_blocks.{n-1-i}.upsamplers.0.conv
    {enc,dec}.mid.block_1 / attn_1 / block_2   mid_block.resnets.0 / attentions.0 / resnets.1
    {enc,dec}.norm_out                     conv_norm_out
    ResBlock nin_shortcut                  conv_shortcut
    attention norm, q, k, v, proj_out      group_norm, to_q, to_k, to_v, to_out.0
                                           (1x1 conv [C, C, 1, 1] <-> linear [C, C])

Old diffusers attention names (query/key/value/proj_attn) are accepted on input.
"""
from __future__ import annotations

import re

import torch

_RES_TO_DIFF = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                "nin_shortcut": "conv_shortcut"}
_RES_TO_LDM = {v: k for k, v in _RES_TO_DIFF.items()}
_ATTN_TO_DIFF = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                 "proj_out": "to_out.0"}
_ATTN_TO_LDM = {v: k for k, v in _ATTN_TO_DIFF.items()}
_ATTN_TO_LDM.update({"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"})
_ATTN_PROJ_LDM = {"q", "k", "v", "proj_out"}


def _num_levels(sd, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = [int(m.group(1)) for k in sd for m in [rx.match(k)] if m]
    if not idx:
        raise KeyError(f"no keys match {pattern!r}; is this an AutoencoderKL state dict?")
    return max(idx) + 1


def _split_leaf(rest: str) -> tuple[str, str]:
    """'to_out.0.weight' -> ('to_out.0', 'weight')."""
    mod, _, leaf = rest.rpartition(".")
    return mod, leaf


def _attn_weight_to_linear(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], v.shape[1]) if v.ndim > 2 else v


def _attn_weight_to_conv(v: torch.Tensor, dims: int = 2) -> torch.Tensor:
    return v.reshape(*v.shape[:2], *([1] * dims)) if v.ndim == 2 else v


def ldm_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vaeflow/LDM-named AutoencoderKL state dict -> diffusers names and shapes (2D only)."""
    n = _num_levels(sd, r"decoder\.up\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        new = None
        m = re.match(r"^(encoder|decoder)\.(conv_in|conv_out)\.(.+)$", key)
        if m or key.startswith(("quant_conv.", "post_quant_conv.")):
            new = key
        elif m := re.match(r"^(encoder|decoder)\.norm_out\.(.+)$", key):
            new = f"{m[1]}.conv_norm_out.{m[2]}"
        elif m := re.match(r"^(encoder|decoder)\.mid\.block_([12])\.(.+)$", key):
            mod, leaf = _split_leaf(m[3])
            new = f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RES_TO_DIFF[mod]}.{leaf}"
        elif m := re.match(r"^(encoder|decoder)\.mid\.attn_1\.(.+)$", key):
            mod, leaf = _split_leaf(m[2])
            new = f"{m[1]}.mid_block.attentions.0.{_ATTN_TO_DIFF[mod]}.{leaf}"
            if mod in _ATTN_PROJ_LDM and leaf == "weight":
                v = _attn_weight_to_linear(v)
        elif m := re.match(r"^(encoder)\.down\.(\d+)\.(block|attn)\.(\d+)\.(.+)$", key) or \
                re.match(r"^(decoder)\.up\.(\d+)\.(block|attn)\.(\d+)\.(.+)$", key):
            part, lvl, kind, j, rest = m.groups()
            mod, leaf = _split_leaf(rest)
            blocks = "down_blocks" if part == "encoder" else "up_blocks"
            lvl = int(lvl) if part == "encoder" else n - 1 - int(lvl)
            if kind == "block":
                new = f"{part}.{blocks}.{lvl}.resnets.{j}.{_RES_TO_DIFF[mod]}.{leaf}"
            else:
                new = f"{part}.{blocks}.{lvl}.attentions.{j}.{_ATTN_TO_DIFF[mod]}.{leaf}"
                if mod in _ATTN_PROJ_LDM and leaf == "weight":
                    v = _attn_weight_to_linear(v)
        elif m := re.match(r"^encoder\.down\.(\d+)\.downsample\.conv\.(.+)$", key):
            new = f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
        elif m := re.match(r"^decoder\.up\.(\d+)\.upsample\.conv\.(.+)$", key):
            new = f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
        if new is None:
            raise KeyError(f"no diffusers name for {key!r}")
        out[new] = v
    return out


def diffusers_to_ldm(sd: dict[str, torch.Tensor], dims: int = 2) -> dict[str, torch.Tensor]:
    """diffusers-named AutoencoderKL state dict -> vaeflow/LDM names and shapes."""
    n = _num_levels(sd, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        new = None
        m = re.match(r"^(encoder|decoder)\.(conv_in|conv_out)\.(.+)$", key)
        if m or key.startswith(("quant_conv.", "post_quant_conv.")):
            new = key
        elif m := re.match(r"^(encoder|decoder)\.conv_norm_out\.(.+)$", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)$", key):
            mod, leaf = _split_leaf(m[3])
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RES_TO_LDM[mod]}.{leaf}"
        elif m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", key):
            mod, leaf = _split_leaf(m[2])
            new = f"{m[1]}.mid.attn_1.{_ATTN_TO_LDM[mod]}.{leaf}"
            if _ATTN_TO_LDM[mod] in _ATTN_PROJ_LDM and leaf == "weight":
                v = _attn_weight_to_conv(v, dims)
        elif m := re.match(r"^(encoder)\.down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$",
                           key) or \
                re.match(r"^(decoder)\.up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", key):
            part, lvl, kind, j, rest = m.groups()
            mod, leaf = _split_leaf(rest)
            blocks = "down" if part == "encoder" else "up"
            lvl = int(lvl) if part == "encoder" else n - 1 - int(lvl)
            if kind == "resnets":
                new = f"{part}.{blocks}.{lvl}.block.{j}.{_RES_TO_LDM[mod]}.{leaf}"
            else:
                new = f"{part}.{blocks}.{lvl}.attn.{j}.{_ATTN_TO_LDM[mod]}.{leaf}"
                if _ATTN_TO_LDM[mod] in _ATTN_PROJ_LDM and leaf == "weight":
                    v = _attn_weight_to_conv(v, dims)
        elif m := re.match(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", key):
            new = f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
        if new is None:
            raise KeyError(f"no vaeflow/LDM name for diffusers key {key!r}")
        out[new] = v
    return out


def is_diffusers_layout(sd) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd)


def infer_kl_config(sd: dict[str, torch.Tensor], resolution: int = 256) -> dict:
    """Recover AutoencoderKL keyword arguments from an LDM-named state dict.

    What weights cannot tell (GroupNorm groups, input resolution) keeps the SD defaults
    (norm_groups 32); `resolution` places the attention levels found in the weights.
    """
    w_in = sd["encoder.conv_in.weight"]
    dims = w_in.ndim - 2
    n = _num_levels(sd, r"encoder\.down\.(\d+)\.")
    widths = [int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(n)]
    nrb = _num_levels(sd, r"encoder\.down\.0\.block\.(\d+)\.")
    z2 = int(sd["encoder.conv_out.weight"].shape[0])
    cfg = dict(in_channels=int(w_in.shape[1]), out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
               down_channels=tuple(widths), num_res_blocks=nrb, spatial_dims=dims,
               mid_attn="encoder.mid.attn_1.q.weight" in sd)
    if int(w_in.shape[0]) != widths[0]:  # ch_mult[0] != 1: stem is base_ch
        base = int(w_in.shape[0])
        if any(w % base for w in widths):
            raise ValueError("cannot express these widths as base_ch * ch_mult")
        cfg.pop("down_channels")
        cfg.update(base_ch=base, ch_mult=tuple(w // base for w in widths))
    z = int(sd["decoder.conv_in.weight"].shape[1])
    cfg["double_z"] = z2 == 2 * z
    cfg["z_channels"] = z
    cfg["embed_dim"] = int(sd["post_quant_conv.weight"].shape[1]) if "post_quant_conv.weight" in sd else z
    cfg["use_quant_conv"] = "quant_conv.weight" in sd
    cfg["use_post_quant_conv"] = "post_quant_conv.weight" in sd
    enc_attn = [resolution // 2 ** i for i in range(n) if f"encoder.down.{i}.attn.0.q.weight" in sd]
    dec_attn = [resolution // 2 ** i for i in range(n) if f"decoder.up.{i}.attn.0.q.weight" in sd]
    cfg["resolution"] = resolution
    cfg["attn_resolutions"] = tuple(enc_attn)
    if dec_attn != enc_attn:
        cfg["dec_attn_resolutions"] = tuple(dec_attn)
    return cfg
