"""Pretrained weights for `model.ckpt_path`: where they come from, whether they fit, what they were.

`model.ckpt_path` accepts (docs/export.md, "Start from pretrained weights"):

    a diffusers folder            config.json + diffusion_pytorch_model.safetensors (or .bin);
                                  a pipeline folder is read from its vae/ subfolder
    a `vaeflow export` folder     config.json with "format": "vaeflow-autoencoder/1" + weights.safetensors
    a .safetensors file           diffusers or LDM/CompVis parameter names
    an LDM .ckpt / .pt / .bin     `state_dict`, `first_stage_model.` prefix and `loss.*` handled
    a vaeflow checkpoint          results/<stage>/best.pt (its EMA weights)
    a Hub id                      owner/name or owner/name/subfolder (downloaded through
                                  huggingface_hub; with HF_HUB_OFFLINE=1 a clear error)

`check_source(model, spec)` compares the source's parameter shapes with a model (built on the
meta device: shapes only) before anything trains, and raises one ConfigError listing the
missing, unexpected and mis-shaped keys and the `model.*` keys to change. `record(spec)` is
what checkpoints keep under provenance["init"]: the source, its kind, file and sha256.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaeflow.checkpoint import file_digest
from vaeflow.config import ConfigError

from .base import clean_state_dict, extract_state_dict

KEY = "model.ckpt_path"
NATIVE_FORMAT = "vaeflow-autoencoder/1"  # the config.json "format" of a `vaeflow export` folder
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                     "diffusion_pytorch_model.fp16.safetensors", "model.safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)?$")
_SHOW = 6  # keys listed per kind of mismatch


@dataclass(frozen=True)
class Source:
    spec: str  # as configured
    kind: str  # diffusers | vaeflow-export | safetensors | torch
    weights: Path
    config: dict | None  # the folder's config.json


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(spec: str | os.PathLike) -> Source:
    """The weights file (and folder config) that `spec` names; a Hub id is downloaded."""
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder(path, spec)
    if path.is_file():
        return Source(spec, "safetensors" if path.suffix == ".safetensors" else "torch", path, None)
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return _folder(_download(spec), spec)
    raise ConfigError(KEY, f"{spec!r}: no such file or folder (expected a diffusers folder, a `vaeflow export` "
                           "folder, a .safetensors / .ckpt / .pt file, a vaeflow checkpoint, or a Hub id owner/name)")


def _folder(path: Path, spec: str) -> Source:
    if not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
        path = path / "vae"  # a diffusers pipeline: its VAE
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ConfigError(KEY, f"{spec!r}: a folder without config.json (expected a diffusers model folder, "
                               "a pipeline folder with vae/, or a `vaeflow export` folder)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise ConfigError(KEY, f"{cfg_file}: not valid JSON ({exc})") from None
    if cfg.get("format") == NATIVE_FORMAT:
        weights = path / cfg.get("weights", "weights.safetensors")
        if not weights.exists():
            raise ConfigError(KEY, f"{spec!r}: {weights.name} is missing from the export folder")
        return Source(spec, "vaeflow-export", weights, cfg)
    for name in DIFFUSERS_WEIGHTS:
        if (path / name).exists():
            return Source(spec, "diffusers", path / name, cfg)
    raise ConfigError(KEY, f"{spec!r}: no weights in {path} (expected one of {', '.join(DIFFUSERS_WEIGHTS)})")


def _download(spec: str) -> Path:
    owner, name, *sub = spec.split("/")
    repo, sub = f"{owner}/{name}", "/".join(sub)
    if offline():
        raise ConfigError(KEY, f"{spec!r} is no local file or folder, and as a Hugging Face Hub id it cannot be "
                               "downloaded: HF_HUB_OFFLINE=1. "
                               f"Download it where there is a network (`hf download {repo} --local-dir DIR`) "
                               f"and set {KEY}: DIR{'/' + sub if sub else ''}")
    from huggingface_hub import snapshot_download

    pre = f"{sub}/" if sub else ""
    patterns = [f"{pre}config.json", f"{pre}diffusion_pytorch_model.safetensors"]
    if not sub:
        patterns += ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    try:
        local = Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as exc:  # network, authentication, unknown repo: one line naming the key
        raise ConfigError(KEY, f"{spec!r} is no local file or folder, and as a Hub id it could not be downloaded "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return local / sub if sub else local


# ---------------------------------------------------------------------------------------------
# reading and naming

def read_state_dict(src: Source, shapes_only: bool = False) -> dict[str, Any]:
    """The source's tensors (or, with `shapes_only`, meta tensors of their shapes: no data read
    from a .safetensors file)."""
    try:
        if src.weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(src.weights), framework="pt") as f:
                if shapes_only:
                    return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
                return {k: f.get_tensor(k) for k in f.keys()}
        try:
            obj = torch.load(str(src.weights), map_location="cpu", weights_only=True, mmap=shapes_only)
        except RuntimeError:  # mmap needs the zip format; old pickles load whole
            obj = torch.load(str(src.weights), map_location="cpu", weights_only=True)
        sd = extract_state_dict(obj)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(KEY, f"{src.spec!r}: cannot read {src.weights.name} "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return {k: torch.empty(v.shape, device="meta") if shapes_only else v for k, v in sd.items()
            if isinstance(v, torch.Tensor)}


def to_model_names(sd: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """LDM / diffusers / wrapped names -> the model's own (vaeflow follows LDM's names)."""
    from .diffusers_keys import diffusers_to_ldm, is_diffusers_layout

    sd = clean_state_dict(sd, own.keys())
    if not is_diffusers_layout(sd):
        return sd
    quant = {k: v for k, v in sd.items() if k.startswith("quantize.")}
    rest = {k: v for k, v in sd.items() if not k.startswith("quantize.")}
    dims = own["encoder.conv_in.weight"].ndim - 2 if "encoder.conv_in.weight" in own else 2
    out = diffusers_to_ldm(rest, dims=dims)
    codebook = quant.pop("quantize.embedding.weight", None)
    if codebook is not None and "quantize.embed" in own:  # diffusers' VQModel -> an EMA codebook
        out["quantize.embed"] = codebook
        out["quantize.embed_sum"] = codebook.clone() if codebook.device.type != "meta" else codebook
        out["quantize.cluster_size"] = (torch.zeros(codebook.shape[0], dtype=codebook.dtype, device=codebook.device))
    elif codebook is not None:
        out["quantize.embedding.weight"] = codebook
    out.update(quant)
    return out


# ---------------------------------------------------------------------------------------------
# checking

def mismatch(own: dict[str, Any], theirs: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped 'key: source [..] vs model [..]')."""
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shaped = [f"{k}: source {list(theirs[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in theirs and tuple(theirs[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, shaped


def _hints(model, theirs: dict[str, Any]) -> str:
    """The model.* keys whose values the source's shapes imply, where they differ."""
    from .diffusers_keys import infer_kl_config

    cfg = getattr(model, "config", None)
    if not isinstance(cfg, dict) or "encoder.conv_in.weight" not in theirs:
        return ""
    try:
        res = min(model.resolution) if hasattr(model, "resolution") else 256
        inferred = infer_kl_config(theirs, resolution=int(res))
    except (KeyError, ValueError, IndexError):
        return ""
    have = dict(cfg)
    have["down_channels"] = tuple(model.channels) if hasattr(model, "channels") else cfg.get("down_channels")
    keys = ["in_channels", "out_channels", "down_channels", "num_res_blocks", "z_channels", "embed_dim",
            "mid_attn", "attn_resolutions", "use_quant_conv", "use_post_quant_conv"]
    if "double_z" in cfg:
        keys.append("double_z")
    diff = []
    for k in keys:
        want = inferred.get("down_channels" if k == "down_channels" else k)
        if k == "down_channels" and want is None and inferred.get("base_ch"):
            want = tuple(inferred["base_ch"] * m for m in inferred["ch_mult"])
        if want is None or k not in have:
            continue
        got = have[k]
        norm = (lambda v: tuple(v) if isinstance(v, (list, tuple)) else v)
        if norm(want) != norm(got):
            shown = list(want) if isinstance(want, tuple) else want
            name = "down_channels (or base_ch x ch_mult)" if k == "down_channels" else k
            diff.append(f"model.{name}: {json.dumps(shown)} (config: {json.dumps(list(got) if isinstance(got, tuple) else got)})")
    return "; the source's shapes imply " + ", ".join(diff) if diff else ""


def check_fits(model, theirs: dict[str, Any], spec: str) -> dict[str, Any]:
    """`theirs` renamed to the model's names; ConfigError naming what differs and which keys to change."""
    own = model.state_dict()
    theirs = to_model_names(theirs, own)
    missing, unexpected, shaped = mismatch(own, theirs)
    if missing or unexpected or shaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
            if keys:
                more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:_SHOW])}{more}")
        raise ConfigError(KEY, f"{spec!r} does not fit model ({model.__class__.__name__}): " + "; ".join(parts)
                          + (_hints(model, theirs) or "; change the model.* keys to the source's architecture"))
    return theirs


def check_source(model, spec: str) -> Source:
    """Shapes only, before training: `model` may live on the meta device."""
    src = resolve(spec)
    check_fits(model, read_state_dict(src, shapes_only=True), spec)
    return src


def load_into(model, spec: str) -> Source:
    """Load the weights `spec` names into `model` (strict: every key, every shape)."""
    src = resolve(spec)
    sd = check_fits(model, read_state_dict(src), spec)
    model.load_state_dict(sd, strict=True)
    return src


def record(spec: str) -> dict[str, Any]:
    """provenance["init"]: what the model started from (no absolute paths for local sources)."""
    src = resolve(spec)
    rec: dict[str, Any] = {"source": str(spec), "kind": src.kind, "file": src.weights.name,
                           "sha256": file_digest(src.weights)}
    if src.config is not None:
        cfg_file = src.weights.parent / "config.json"
        rec["config_sha256"] = file_digest(cfg_file)
        cfg = src.config.get("latent", src.config)  # a vaeflow export keeps its factors under "latent"
        for key in ("scaling_factor", "shift_factor"):
            if cfg.get(key) is not None:
                rec[key] = float(cfg[key])
    return rec
