"""The model card (README.md) of a `vaeflow export` folder: how to load it, the data, the config,
the stages, the test metrics with their protocol, the latent statistics and the provenance."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from vaeflow.checkpoint import file_digest
from vaeflow.config import resolve_steps

_LOAD = {
    "AutoencoderKL": """```python
import torch
from diffusers import AutoencoderKL
vae = AutoencoderKL.from_pretrained("{where}").eval()
x = torch.rand(1, {c}, {h}, {w}) * 2 - 1                      # images in [-1, 1]
z = (vae.encode(x).latent_dist.sample() - (vae.config.shift_factor or 0)) * vae.config.scaling_factor
x_rec = vae.decode(z / vae.config.scaling_factor + (vae.config.shift_factor or 0)).sample
```""",
    "VQModel": """```python
import torch
from diffusers import VQModel
vq = VQModel.from_pretrained("{where}").eval()
x = torch.rand(1, {c}, {h}, {w}) * 2 - 1                      # images in [-1, 1]
x_rec = vq(x).sample                                           # encode, quantize, decode
```""",
    "vaeflow": """```python
import torch
from vaeflow.models.loading import load_exported
model, meta = load_exported("{where}")                         # no training config needed
x = torch.rand(1, {c}, {h}, {w}) * 2 - 1                      # images in [-1, 1] ({rng})
x_rec = model.ae_forward(x, sample_posterior=False).recon
```""",
}


def _fmt(v, spec=".4f"):
    return "n/a" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _stages(config: dict, upto: int) -> list[str]:
    rows = ["| # | stage | epochs | losses | frozen | from |", "| --- | --- | --- | --- | --- | --- |"]
    for i, s in enumerate(resolve_steps(config)[: upto + 1]):
        losses = [s["recon_type"]]
        if s["kl_beta"]:
            losses.append(f"KL x {s['kl_beta']:g}")
        if s["use_lpips"]:
            losses.append(f"LPIPS ({s['lpips_net']}) x {s['lambda_lpips']:g}")
        if s["gan_training"]:
            losses.append(f"PatchGAN x {s['lambda_adv']:g}")
        frozen = sorted(set(s["freeze"]) - set(s["unfreeze"])) or ["-"]
        start = "previous stage's best.pt" if i else (f"`{config['model']['ckpt_path']}`" if config["model"].get("ckpt_path") else "random init")
        rows.append(f"| {i + 1} | {s['name']} | {s['n_epochs']} | {', '.join(losses)} | {', '.join(frozen)} | {start} |")
    return rows


def _metrics(m: dict | None) -> list[str]:
    if not m:
        return ["No `eval/metrics.json` beside the checkpoint: not evaluated."]
    lp, fid = m.get("lpips") or {}, m.get("rfid") or {}
    nll = m.get("nll") or {}
    def na(sec):
        return "unavailable: " + str(sec.get("reason")).split(";")[0].split(" at /")[0]

    rows = ["| metric | value |", "| --- | --- |",
            f"| PSNR (dB) | {_fmt(m.get('psnr'), '.2f')} |", f"| SSIM | {_fmt(m.get('ssim'))} |",
            f"| MSE | {_fmt(m.get('mse'), '.6f')} |", f"| L1 | {_fmt(m.get('l1'), '.6f')} |",
            f"| LPIPS ({lp.get('net', '')}) | {_fmt(lp.get('value')) if lp.get('value') is not None else na(lp)} |",
            f"| rFID | {_fmt(fid.get('value'), '.3f') if fid.get('value') is not None else na(fid)} |"]
    if nll.get("iw_nll_nats") is not None:
        rows.append(f"| IW-NLL (k={nll.get('iw_samples')}), nats / bpd | {nll['iw_nll_nats']:.2f} / {nll.get('iw_nll_bpd', float('nan')):.4f} |")
    cb = m.get("codebook") or {}
    if cb.get("perplexity") is not None:
        rows.append(f"| codebook usage / perplexity | {cb['usage']:.3f} / {cb['perplexity']:.1f} |")
    if "pca" in m:
        rows.append(f"| PCA baseline ({m['pca']['components']} components) PSNR | {_fmt(m['pca'].get('psnr'), '.2f')} |")
    rows += ["", f"Protocol: the test split ({m.get('test_images')} images of shape {m.get('image_shape')}), "
                 f"{m.get('weights', 'ema')} weights of `{Path(str(m.get('checkpoint'))).name}`, reconstruction from the "
                 f"{m.get('reconstruction')}; pixels in [0, 1]; PSNR from the mean MSE over the split. "
                 "See vaeflow's docs/evaluation.md."]
    return rows


def _latents(factors: dict) -> list[str]:
    st = factors.get("stats")
    rows = [f"- `scaling_factor` **{factors['scaling_factor']:.6g}**, `shift_factor` **{factors['shift_factor']:.6g}**: "
            f"{factors['how']}.",
            "- A diffusion model trains on `scaling_factor * (z - shift_factor)` (SD3 / FLUX convention)."]
    if st:
        rows.append(f"- Test-split latents ({st.get('latent')}, {st.get('images')} images): mean {st['mean']:.6g}, "
                    f"std {st['std']:.6g}; fitted scaling_factor {_fmt(st.get('scaling_factor'), '.6g')}, "
                    f"shift_factor {st['shift_factor']:.6g}.")
        rows.append("- Per channel (mean / std): " + ", ".join(
            f"{i}: {a:.4g} / {b:.4g}" for i, (a, b) in enumerate(zip(st["channels_mean"], st["channels_std"]))))
        scaled = st["std"] * factors["scaling_factor"]
        rows.append(f"- With the written factor, the test latents have std {scaled:.4g}.")
    return rows


def model_card(checkpoint: Path, state: dict, model, kind: str, factors: dict, metrics: dict | None,
               cfg: dict[str, Any]) -> str:
    from vaeflow.interop.export import manifest_for

    config = state["config"]
    data = config["data"]
    shape = list(metrics.get("image_shape")) if metrics and metrics.get("image_shape") else None
    c = model.config.get("in_channels", data.get("channels") or 3) if isinstance(getattr(model, "config", None), dict) else 3
    h, w = (shape[-2], shape[-1]) if shape else (data.get("image_size") or 256,) * 2
    fmt = {"AutoencoderKL": "diffusers `AutoencoderKL`", "VQModel": "diffusers `VQModel`",
           "vaeflow": "the vaeflow format (config.json + weights.safetensors, vaeflow's docs/export.md)"}[kind]
    prov = state.get("provenance") or {}
    git = prov.get("git") or {}
    init = prov.get("init")
    manifest = manifest_for(checkpoint)
    lines = [
        "---", "library_name: " + ("diffusers" if kind != "vaeflow" else "vaeflow"), "tags: [autoencoder, vaeflow]", "---", "",
        f"# {config['model']['type']} from vaeflow stage `{state['stage']}`", "",
        f"Format: {fmt}. Latent shape per image: {list(model.latent_shape)}.", "",
        "## Load it", "",
        _LOAD[kind].format(where="<this folder or repo id>", c=c, h=h, w=w, rng=model.input_range), "",
        "## Data", "",
        f"- dataset `{data['dataset']}`, image size {data.get('image_size')}, channels {data.get('channels')}, "
        f"split {json.dumps(data.get('split'))} (seed {data.get('split_seed')})",
    ]
    if manifest:
        lines.append(f"- prepared counts {json.dumps(manifest.get('counts'))}, dtype {manifest.get('dtype')}")
    lines += ["", "## Stages", "", *_stages(config, int(state.get("stage_index", 0))), "",
              f"Exported from `{checkpoint.name}` after epoch {state.get('epoch')} (step {state.get('global_step')}), "
              "EMA weights when the stage kept them.", "",
              "## Test metrics", "", *_metrics(metrics), "",
              "## Latent statistics", "", *_latents(factors), "",
              "## Config", "", "```yaml", yaml.safe_dump({"model": config["model"], "data": data,
                                                          "training": config["training"]}, sort_keys=False).rstrip(), "```", "",
              "## Provenance", "",
              f"- checkpoint `{checkpoint.name}` sha256 `{file_digest(checkpoint)}`",
              f"- git commit `{git.get('commit')}`{' (dirty)' if git.get('dirty') else ''}, vaeflow code fingerprint `{prov.get('code_fingerprint')}`",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items())]
    if init:
        lines.append(f"- started from `{init.get('source')}` ({init.get('kind')}, `{init.get('file')}` sha256 `{init.get('sha256')}`)")
    return "\n".join(lines) + "\n"
