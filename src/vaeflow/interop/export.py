"""`vaeflow export`: a trained stage as a folder another library (or vaeflow alone) loads.

    autoencoder_kl  -> diffusers AutoencoderKL   (config.json + diffusion_pytorch_model.safetensors)
    vqvae           -> diffusers VQModel          (the same files; a 2D vector-quantizer model)
    anything else   -> the vaeflow format         (config.json + weights.safetensors; MAGVIT LFQ/FSQ,
                       cnn_vae, 3D models)        loaded by `vaeflow.models.loading.load_exported`

Every folder also gets a model card (README.md: data, config, stages, test metrics and their
protocol, latent statistics, provenance). The latent normalisation written into the config is,
by default, the one fitted on the test split by evaluation (`latent_stats` of the stage's
eval/metrics.json, SD3/FLUX definitions: shift_factor = mean, scaling_factor = 1 / std);
`keep_scale` keeps the source model's factor instead (a decoder-only fine-tune, whose latents
must not move). docs/export.md documents the formats.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

from vaeflow import checkpoint as ckpt
from vaeflow.layout import DATA, EVAL_METRICS, MANIFEST
from vaeflow.models.pretrained import NATIVE_FORMAT, offline

FORMATS = ("auto", "diffusers", "vaeflow")
NATIVE_WEIGHTS = "weights.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
CARD = "README.md"


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked (one line: why, and what to do)."""


# ---------------------------------------------------------------------------------------------
# which format a model maps to

def diffusers_class(model) -> tuple[str | None, str]:
    """("AutoencoderKL" | "VQModel" | None, why not)."""
    from vaeflow.models.autoencoder_kl import AutoencoderKL
    from vaeflow.models.quantizers import VectorQuantizer
    from vaeflow.models.vqvae import VQVAE

    if isinstance(model, AutoencoderKL):
        from vaeflow.interop.diffusers import config_to_diffusers

        try:
            config_to_diffusers(model)
        except ValueError as exc:
            return None, kl_reason(model, str(exc))
        return "AutoencoderKL", ""
    if isinstance(model, VQVAE):
        if not isinstance(model.quantize, VectorQuantizer):
            return None, (f"diffusers has no {type(model.quantize).__name__} quantizer (its VQModel is a "
                          "nearest-neighbour codebook)")
        try:
            vq_config_to_diffusers(model)
        except ValueError as exc:
            return None, str(exc)
        return "VQModel", ""
    return None, f"diffusers has no model for {type(model).__name__}"


def kl_reason(model, msg: str) -> str:
    c = model.config
    if c["z_channels"] != c["embed_dim"]:
        return (f"diffusers' AutoencoderKL has one latent width (its encoder ends in 2 x latent_channels, its decoder "
                f"starts from latent_channels), but this model has z_channels {c['z_channels']} and embed_dim "
                f"{c['embed_dim']}. Folding quant_conv into the encoder is exact, but folding post_quant_conv "
                f"({c['embed_dim']} -> {c['z_channels']}) into the decoder's first 3x3 conv is not while it has a "
                "bias: at the image borders the conv's zero padding would see that bias. The nearest exportable "
                "shape keeps the latent: set model.post_quant_bias: false or "
                f"model.z_channels: {c['embed_dim']} (== model.embed_dim) and retrain, "
                "or export this model as it is with --format vaeflow")
    return msg


def _backbone_to_diffusers(model) -> dict[str, Any]:
    c = model.config
    if c["spatial_dims"] != 2:
        raise ValueError("diffusers' VQModel is 2D; this model has spatial_dims=3")
    if c["tanh_out"]:
        raise ValueError("diffusers has no tanh output")
    chans = list(model.channels)
    if model.encoder.conv_in.out_channels != chans[0]:
        raise ValueError("diffusers needs the stem width to equal the first stage width (ch_mult[0] == 1)")
    if c.get("dropout"):
        raise ValueError("diffusers' VQModel has no dropout")
    n = len(chans)
    enc = [len(model.encoder.down[i].attn) > 0 for i in range(n)]
    dec = [len(model.decoder.up[n - 1 - k].attn) > 0 for k in range(n)]
    res = model.resolution
    if res[0] != res[1]:
        raise ValueError("diffusers' VQModel takes one sample_size (square images)")
    return dict(in_channels=c["in_channels"], out_channels=c["out_channels"],
                down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in enc],
                up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in dec],
                block_out_channels=chans, layers_per_block=c["num_res_blocks"], act_fn=c["act"],
                norm_num_groups=c["norm_groups"], sample_size=res[0],
                mid_block_add_attention=c["mid_attn"])


def vq_config_to_diffusers(model) -> dict[str, Any]:
    """vaeflow VQVAE (vector quantizer) -> diffusers VQModel constructor arguments."""
    if model.causal:
        raise ValueError("diffusers' VQModel has no causal convolutions")
    return dict(**_backbone_to_diffusers(model), latent_channels=model.config["z_channels"],
                num_vq_embeddings=model.quantize.codebook_size, vq_embed_dim=model.quantize.code_dim,
                norm_type="group", lookup_from_codebook=False, force_upcast=False)


def vq_state_to_diffusers(model) -> dict[str, torch.Tensor]:
    from vaeflow.models.diffusers_keys import ldm_to_diffusers

    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if not k.startswith("quantize.")}
    out = ldm_to_diffusers(sd)
    out["quantize.embedding.weight"] = model.quantize.codebook.detach().to("cpu").float().contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# the latent normalisation

def read_metrics(checkpoint: Path) -> dict | None:
    path = checkpoint.parent / EVAL_METRICS
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ExportError(f"{path}: not valid JSON; rerun evaluate") from None


def source_factors(model, state: dict) -> tuple[float, float, str]:
    """The factor the model came with: its pretrained source's (provenance["init"]), else its own."""
    init = (state.get("provenance") or {}).get("init") or {}
    if init.get("scaling_factor") is not None:
        return float(init["scaling_factor"]), float(init.get("shift_factor") or 0.0), f"kept from the source {init.get('source')}"
    cfg = getattr(model, "config", {}) or {}
    if "latent_scale" in cfg:
        return float(cfg["latent_scale"]), float(cfg.get("latent_shift") or 0.0), "kept: the model's latent_scale / latent_shift"
    return 1.0, 0.0, "kept: none (1.0, no shift)"


def latent_factors(model, state: dict, checkpoint: Path, metrics: dict | None, keep_scale: bool) -> dict[str, Any]:
    stats = (metrics or {}).get("latent_stats")
    if keep_scale:
        scale, shift, how = source_factors(model, state)
        return {"scaling_factor": scale, "shift_factor": shift, "how": how, "stats": stats}
    metrics_path = checkpoint.parent / EVAL_METRICS
    if metrics is None:
        raise ExportError(f"no {metrics_path}: the fitted latent scale comes from evaluation; run "
                          f"`snakemake --cores 8 {metrics_path}` (or `vaeflow evaluate --stage {checkpoint.parent.name}`) "
                          "first, or pass --keep-scale to keep the model's own factor")
    scored = Path(str(metrics.get("checkpoint", ""))).name
    if scored and scored != checkpoint.name:
        raise ExportError(f"{metrics_path} scores {scored}, not {checkpoint.name}: export {scored}, "
                          "or set evaluation.checkpoint and rerun evaluate, or pass --keep-scale")
    if not stats or stats.get("scaling_factor") is None:
        raise ExportError(f"{metrics_path} has no fitted latent statistics (written before vaeflow fitted them, or "
                          "constant latents): rerun evaluate, or pass --keep-scale")
    return {"scaling_factor": float(stats["scaling_factor"]), "shift_factor": float(stats["shift_factor"]),
            "how": f"fitted on the test split ({metrics_path})", "stats": stats}


# ---------------------------------------------------------------------------------------------
# writing

def _save_safetensors(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(path), metadata=metadata)


def _diffusers_version() -> str:
    from vaeflow.interop.diffusers import _diffusers_version as v

    return v()


def write_kl(model, out: Path, factors: dict) -> dict:
    from vaeflow.interop.diffusers import config_to_diffusers, folded_state_dict
    from vaeflow.models.diffusers_keys import ldm_to_diffusers

    dcfg = {"_class_name": "AutoencoderKL", "_diffusers_version": _diffusers_version(), **config_to_diffusers(model),
            "force_upcast": True, "latents_mean": None, "latents_std": None}
    dcfg["scaling_factor"] = factors["scaling_factor"]
    dcfg["shift_factor"] = factors["shift_factor"] or None
    _save_safetensors(ldm_to_diffusers(folded_state_dict(model)), out / DIFFUSERS_WEIGHTS, {"format": "pt"})
    return dcfg


def write_vq(model, out: Path, factors: dict) -> dict:
    dcfg = {"_class_name": "VQModel", "_diffusers_version": _diffusers_version(), **vq_config_to_diffusers(model),
            "scaling_factor": factors["scaling_factor"]}
    _save_safetensors(vq_state_to_diffusers(model), out / DIFFUSERS_WEIGHTS, {"format": "pt"})
    return dcfg


def write_native(model, model_cfg: dict, out: Path, factors: dict) -> dict:
    """The vaeflow format (docs/export.md): config.json names the model family and every constructor
    option, the latent and its normalisation; weights.safetensors holds the (EMA) weights."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        vaeflow_version = version("vaeflow")
    except PackageNotFoundError:
        vaeflow_version = None
    meta = {"format": NATIVE_FORMAT, "weights": NATIVE_WEIGHTS, "model": model_cfg,
            "input_range": model.input_range,
            "latent": {"shape": [int(s) for s in model.latent_shape], "scaling_factor": factors["scaling_factor"],
                       "shift_factor": factors["shift_factor"]},
            "vaeflow_version": vaeflow_version}
    quant = getattr(model, "quantize", None)
    if quant is not None:
        meta["latent"].update(codebook_size=int(quant.codebook_size), quantizer=type(quant).__name__)
    _save_safetensors(dict(model.state_dict()), out / NATIVE_WEIGHTS, {"format": "pt", "vaeflow_format": NATIVE_FORMAT})
    return meta


def _install(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished `tmp` (a reader never sees a half-written export)."""
    if out.exists():
        if out.is_file() or (any(out.iterdir()) and not (out / "config.json").exists()):
            raise ExportError(f"{out} exists and is not an export folder: choose another output folder")
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def check_push_possible(repo: str) -> None:
    """Refuse --push-to-hub before anything is written when no upload can work."""
    if offline():
        raise ExportError(f"--push-to-hub {repo}: HF_HUB_OFFLINE=1 forbids network access; nothing was written or "
                          "uploaded. Export without --push-to-hub and upload the folder later (`hf upload`)")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError as exc:
        raise ExportError(f"--push-to-hub {repo}: huggingface.co is not reachable ({exc}); nothing was written or "
                          "uploaded. Export without --push-to-hub and upload the folder later (`hf upload`)") from None


def push_to_hub(folder: Path, repo: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="vaeflow export")
    return f"https://huggingface.co/{repo}"


def export_checkpoint(checkpoint, out_dir, *, fmt: str = "auto", keep_scale: bool = False,
                      push: str | None = None, log=print) -> Path:
    """Write the stage checkpoint `checkpoint` (results/<stage>/best.pt) to `out_dir`."""
    from vaeflow.models.loading import load_autoencoder

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if push:
        check_push_possible(push)
    checkpoint, out = Path(checkpoint), Path(out_dir)
    model, state = load_autoencoder(checkpoint)
    model_cfg = {k: v for k, v in state["config"]["model"].items() if k != "ckpt_path"}
    cls, why = diffusers_class(model)
    if fmt == "diffusers" and cls is None:
        raise ExportError(f"{checkpoint} cannot be exported to diffusers: {why}")
    kind = cls if fmt in ("auto", "diffusers") and cls else "vaeflow"
    metrics = read_metrics(checkpoint)
    factors = latent_factors(model, state, checkpoint, metrics, keep_scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if kind == "AutoencoderKL":
            cfg = write_kl(model, tmp, factors)
        elif kind == "VQModel":
            cfg = write_vq(model, tmp, factors)
        else:
            cfg = write_native(model, model_cfg, tmp, factors)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        from vaeflow.interop.card import model_card

        (tmp / CARD).write_text(model_card(checkpoint, state, model, kind, factors, metrics, cfg))
        for f in tmp.iterdir():
            ckpt.fsync_path(f)
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fmt_name = (f"diffusers {kind}" if kind != "vaeflow" else "the vaeflow format" if cls is not None or fmt == "vaeflow"
                else f"the vaeflow format, not diffusers ({why.split('. ')[0]}; `vaeflow export-diffusers` says why in full)")
    log(f"wrote {out} as {fmt_name}; scaling_factor {factors['scaling_factor']:.6g}, shift_factor "
        f"{factors['shift_factor']:.6g} ({factors['how']})")
    if push:
        log(f"pushed to {push_to_hub(out, push)}")
    return out


def manifest_for(checkpoint: Path) -> dict | None:
    """results/data/manifest.json beside a results/<stage>/ checkpoint, when there is one."""
    path = checkpoint.parent.parent / DATA / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
