"""Test-split evaluation of a trained stage: `results/<stage>/eval/metrics.json`.

Works for every model family through the autoencoder protocol (CONTRIBUTING.md):

- reconstruction (EMA weights, posterior mode / quantized code): MSE, L1, PSNR, SSIM, and
  LPIPS and rFID when their weights are on disk (otherwise recorded as unavailable, with
  why; rFID with its protocol: images, preprocessing, weights sha256, library versions);
- KL models: negative ELBO (nats per image, bits per dimension) and the importance-weighted
  NLL estimate with k = `evaluation.iw_samples`, under a likelihood stated in the output
  (Bernoulli for BCE / unit-range models, otherwise a discretized Gaussian with a fixed
  sigma fitted on the validation split, or as configured);
- VQ models: codebook usage and perplexity over the whole test split;
- active latent units (Burda et al. 2015) for every model;
- the PCA baseline with the same number of latent dimensions (fit on a capped train subsample).

Everything runs on the model's device, streamed in batches (memory does not grow with the
dataset). The metric formulas live in `vaeflow.metrics`, the LPIPS / rFID / PCA / likelihood
pieces in `vaeflow.eval`; this module runs the model over data.
"""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from vaeflow import metrics as M
from vaeflow.checkpoint import atomic_write
from vaeflow.config import schema_defaults
from vaeflow.eval.fid import rfid_scorer
from vaeflow.eval.likelihood import batches as _batches
from vaeflow.eval.likelihood import choose_likelihood, decode_fn, fit_sigma, nll_section  # noqa: F401
from vaeflow.eval.likelihood import first_param as _param
from vaeflow.eval.pca import pca_baseline
from vaeflow.eval.perceptual import lpips_per_image as _lpips_per_image  # noqa: F401 (kept importable)
from vaeflow.eval.perceptual import lpips_scorer
from vaeflow.metrics import to_model_range as _to_model_range
from vaeflow.metrics import to_unit as _to_unit
from vaeflow.models.loading import load_autoencoder


# ----------------------------------------------------------------------------- model adapters


def code_indices(model, x_model: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """Codebook indices of a VQ model (`encode(x) -> (z_q, loss, info{indices})` and
    `quantize.codebook_size`), or None when the model exposes none."""
    quant = getattr(model, "quantize", None)
    size = getattr(quant, "codebook_size", None)
    if size is None or not hasattr(model, "encode"):
        return None
    out = model.encode(x_model)
    if isinstance(out, tuple) and len(out) >= 3 and isinstance(out[2], dict) and "indices" in out[2]:
        return out[2]["indices"], int(size)
    return None


# ----------------------------------------------------------------------------- the evaluation


def _finite(obj):
    """JSON without NaN/Infinity (DVC and most readers reject them): non-finite -> null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


@torch.no_grad()
def evaluate_model(
    model,
    test_ds,
    *,
    train_ds=None,
    val_ds=None,
    eval_cfg: dict | None = None,
    recon_type: str | None = None,
    levels: int = 256,
    seed: int = 0,
    log=print,
) -> dict:
    """Every test-split metric of one model (already in eval mode, on CPU or its device; every
    metric runs on that device)."""
    cfg = {**schema_defaults("evaluation"), **(eval_cfg or {})}
    bs = int(cfg["batch_size"])
    device = _param(model).device
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)

    # Pass 1: reconstructions, posteriors, latents, codes.
    sse = sae = 0.0
    n_pix = n_img = 0
    psnrs, ssims, lpips_vals = [], [], []
    kl_sum, is_kl = 0.0, None
    moments = M.RunningMoments()
    latents = M.LatentMoments()  # what a latent-diffusion model would train on: its fitted scale
    latent_gen = torch.Generator().manual_seed(seed)  # its own draws: the NLL's stay as they were
    code_counts = None
    lpips_fn, lpips_info = lpips_scorer(cfg["lpips_net"], device=device, log=log)
    rfid, rfid_info = rfid_scorer(cfg, device, test_ds[0].dim() - 1 if len(test_ds) else 2, log=log)
    vq_batch_stats: dict[str, list[float]] = {}
    image_shape = None
    for x in _batches(test_ds, bs):  # every metric on the model's device, batch by batch
        image_shape = tuple(x.shape[1:])
        x = x.to(device)
        xm = _to_model_range(x, model).to(_param(model).dtype)
        out = model.ae_forward(xm, sample_posterior=False)
        rec = _to_unit(out.recon.float(), model)
        sse += float((rec.double() - x.double()).pow(2).sum())
        sae += float((rec.double() - x.double()).abs().sum())
        n_pix += x.numel()
        n_img += x.shape[0]
        psnrs.append(M.psnr_per_image(rec, x))
        ssims.append(M.ssim_per_image(rec, x).cpu())
        if lpips_fn is not None:
            lpips_vals.append(lpips_fn(rec, x).cpu())
        if rfid is not None:
            rfid.update(rec, x)
        is_kl = out.posterior is not None
        deterministic = is_kl and bool(getattr(out.posterior, "deterministic", False))
        if is_kl:
            kl_sum += float(M.kl_std_normal(out.posterior.mean, out.posterior.logvar).sum())
            moments.add(out.posterior.mean)
            eps = torch.randn(out.posterior.mean.shape, generator=latent_gen).to(device, out.posterior.mean.dtype)
            latents.add(out.posterior.mean + out.posterior.std * eps)  # deterministic: std is 0
        else:
            z = model.encode_latent(xm)
            moments.add(z)
            latents.add(z)
            codes = code_indices(model, xm)
            if codes is not None:
                idx, size = codes
                c = torch.bincount(idx.reshape(-1).cpu(), minlength=size)
                code_counts = c if code_counts is None else code_counts + c
            for k, v in (out.stats or {}).items():
                vq_batch_stats.setdefault(k, []).append(float(v))
    if n_img == 0:
        raise ValueError("evaluation: the test split is empty")
    rfid_result = rfid.result() if rfid is not None else rfid_info
    # The LPIPS and Inception networks (~300 MB) are done: free them before the likelihood
    # and PCA passes, which set the peak memory on large data (benchmarks/bench_eval_memory.py).
    lpips_fn = rfid = None
    gc.collect()
    mse = sse / n_pix
    latent_shape = [int(s) for s in model.latent_shape]
    latent_dims = int(np.prod(latent_shape))
    dims = int(np.prod(image_shape))
    variances = moments.variance()
    res: dict = {
        "split": "test",
        "test_images": n_img,
        "image_shape": list(image_shape),
        "dims_per_image": dims,
        "latent_shape": latent_shape,
        "latent_dims": latent_dims,
        "model_family": "kl" if is_kl else "vq",
        "reconstruction": "posterior mode" if is_kl else "quantized code",
        "mse": mse,
        "l1": sae / n_pix,
        "psnr": M.psnr(mse),
        "psnr_mean_per_image": float(torch.cat(psnrs).clamp(max=1e6).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "ssim_window": M.ssim_window_size(image_shape[-2], image_shape[-1]),
        "lpips": {**lpips_info, **({"value": float(torch.cat(lpips_vals).mean())} if lpips_vals else {})},
        "rfid": rfid_result,
        "device": str(device),
        "active_units": {
            "count": M.active_units(variances, cfg["active_unit_threshold"]),
            "of": latent_dims,
            "threshold": cfg["active_unit_threshold"],
            "statistic": "variance over test images of the " + ("posterior mean" if is_kl else "quantized latent"),
        },
        "latent_stats": latent_stats(latents, "posterior sample (one per test image, seed %d)" % seed if is_kl and not deterministic
                                     else "posterior mean (deterministic encoder)" if is_kl else "quantized latent"),
    }
    if not is_kl:
        res["codebook"] = (
            {**M.codebook_stats(code_counts), "over": "all test-split codes"}
            if code_counts is not None
            else {**{k: float(np.mean(v)) for k, v in vq_batch_stats.items() if k in ("usage", "perplexity")},
                  "over": "mean of per-batch stats (the model exposes no code indices)"}
        )
        res["nll"] = {"available": False, "reason": "VQ model: no posterior q(z|x), so no ELBO / importance-weighted NLL"}
    elif deterministic:
        res["model_family"] = "deterministic"
        res["codebook"] = {"available": False, "reason": "deterministic autoencoder: no codebook"}
        res["nll"] = {"available": False, "reason": "deterministic encoder (no posterior variance, e.g. double_z: false): no ELBO / IW-NLL"}
    else:
        res["kl_per_image"] = kl_sum / n_img
        res["codebook"] = {"available": False, "reason": "KL model: no codebook"}
        res["nll"] = nll_section(model, test_ds, val_ds or train_ds, cfg, recon_type, levels, dims, gen, log)

    if train_ds is not None and len(train_ds):
        res["pca"] = pca_baseline(train_ds, test_ds, latent_dims, image_shape, max_images=cfg["pca_max_images"],
                                  seed=seed, device=device, batch_size=bs)
        res["beats_pca"] = res["mse"] < res["pca"]["mse"]
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def latent_stats(latents: M.LatentMoments, statistic: str) -> dict:
    """`latent_stats` of eval/metrics.json: per-channel and overall mean / std of the test
    latents and the diffusion normalisation they fit (SD3 / FLUX definitions, docs/export.md):
    `scaling_factor * (z - shift_factor)` has mean 0 and std 1 on the test split.
    `vaeflow export` writes these factors into the exported model's config."""
    return {**latents.result(), "split": "test", "latent": statistic,
            "definition": "shift_factor = mean(z), scaling_factor = 1 / std(z) over every element of every test latent; "
                          "a diffusion model trains on scaling_factor * (z - shift_factor)"}


def test_dataset(data_dir, seed: int = 0):
    """The test split; dynamically binarized data gets one fixed (seeded) Bernoulli draw so
    evaluation is repeatable. Returns (dataset, how it was binarized)."""
    from vaeflow.data import PreparedDataset

    probe = PreparedDataset(data_dir, "test")
    mode = probe.manifest.get("binarize", "none")
    if mode == "dynamic":
        return PreparedDataset(data_dir, "test", binarize="static", seed=seed), f"dynamic data: one fixed Bernoulli draw per image (seed {seed})"
    return probe, {"static": "binarized at prepare time", "none": "not binarized"}.get(mode, mode)


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path, batch_size: int | None = None,
                        eval_cfg: dict | None = None, seed: int | None = None, log=print,
                        device: str | torch.device = "cpu") -> dict:
    from vaeflow.config import resolve_steps
    from vaeflow.data import PreparedDataset

    model, state = load_autoencoder(checkpoint, device=device)
    cfg = {**schema_defaults("evaluation"), **(eval_cfg or {})}
    if batch_size is not None:
        cfg["batch_size"] = batch_size
    seed = state["config"].get("seed", 0) if seed is None else seed
    test, binarization = test_dataset(data_dir, seed)
    train = PreparedDataset(data_dir, "train", binarize="none")
    val = PreparedDataset(data_dir, "val", binarize="none")
    if test.manifest.get("binarize") in ("dynamic", "static"):
        val = PreparedDataset(data_dir, "val", binarize="static", seed=seed)
    try:
        recon_type = resolve_steps(state["config"])[state["stage_index"]]["recon_type"]
    except (KeyError, IndexError, TypeError):
        recon_type = None
    levels = int(test.scale) + 1
    metrics = evaluate_model(model, test, train_ds=train, val_ds=val if len(val) else None, eval_cfg=cfg,
                             recon_type=recon_type, levels=levels, seed=seed, log=log)
    head = {
        "stage": state["stage"],
        "checkpoint": str(checkpoint),
        "weights": "ema" if state.get("ema") is not None else "model",
        "epoch": state.get("epoch"),
        "global_step": state.get("global_step"),
        "recon_type": recon_type,
        "test_binarization": binarization,
    }
    return _finite({**head, **metrics})


def write_metrics(metrics: dict, out: str | Path) -> None:
    text = json.dumps(_finite(metrics), indent=2, allow_nan=False) + "\n"
    atomic_write(out, lambda f: f.write(text.encode()))


def summary_line(stage: str, m: dict) -> str:
    """The one-line verdict the evaluate log prints."""
    extra = "".join(f", {name} {_perceptual(m.get(key))}" for key, name in (("lpips", "LPIPS"), ("rfid", "rFID")))
    parts = [f"{stage}: test MSE {m['mse']:.5f} (PSNR {_fmt(m.get('psnr'), '.2f')} dB, SSIM {m['ssim']:.4f}{extra})"]
    nll = m.get("nll") or {}
    if nll.get("iw_nll_nats") is not None:
        parts.append(f"-ELBO {nll['neg_elbo_nats']:.2f} nats ({nll['neg_elbo_bpd']:.4f} bpd), "
                     f"IW-NLL(k={nll['iw_samples']}) {nll['iw_nll_nats']:.2f} nats [{nll['likelihood']['kind']}]")
    cb = m.get("codebook") or {}
    if cb.get("perplexity") is not None:
        parts.append(f"codebook usage {cb['usage']:.3f}, perplexity {cb['perplexity']:.1f}")
    if "pca" in m:
        parts.append(
            f"vs PCA with {m['pca']['components']} components MSE {m['pca']['mse']:.5f} "
            f"(PSNR {_fmt(m['pca']['psnr'], '.2f')} dB): {'better' if m['beats_pca'] else 'WORSE'} than PCA"
        )
    return "; ".join(parts)


def _perceptual(sec: dict | None) -> str:
    """LPIPS / rFID for the log line: the value, "n/a", and a mark when not comparable."""
    if not sec or sec.get("value") is None:
        return "n/a"
    mark = "" if sec.get("comparable", True) else " (NOT comparable: test weights)"
    return f"{sec['value']:.4g}{mark}"


def _fmt(v, spec: str) -> str:
    return "inf" if v is None else format(v, spec)
