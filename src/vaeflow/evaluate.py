"""Test-split evaluation of a trained stage: `results/<stage>/eval/metrics.json`.

Works for every model family through the autoencoder protocol (CONTRIBUTING.md):

- reconstruction (EMA weights, posterior mode / quantized code): MSE, L1, PSNR, SSIM, and
  LPIPS when the backbone weights are on disk (otherwise recorded as unavailable);
- KL models: negative ELBO (nats per image, bits per dimension) and the importance-weighted
  NLL estimate with k = `evaluation.iw_samples`, under a likelihood stated in the output
  (Bernoulli for BCE / unit-range models, otherwise a discretized Gaussian with a fixed
  sigma fitted on the validation split, or as configured);
- VQ models: codebook usage and perplexity over the whole test split;
- active latent units (Burda et al. 2015) for every model;
- the PCA baseline with the same number of latent dimensions (fit on the train split).

The metric formulas live in `vaeflow.metrics`; this module only runs the model over data.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from vaeflow import metrics as M
from vaeflow.checkpoint import atomic_write
from vaeflow.metrics import to_model_range as _to_model_range
from vaeflow.metrics import to_unit as _to_unit
from vaeflow.models.loading import load_autoencoder

# Defaults of the `evaluation:` config section (the schema carries the same values).
EVAL_DEFAULTS = {
    "batch_size": 256,
    "checkpoint": "best",
    "iw_samples": 64,
    "nll_max_images": None,
    "likelihood": "auto",
    "likelihood_sigma": None,
    "lpips_net": "alex",
    "active_unit_threshold": 0.01,
}

psnr = M.psnr  # kept importable from here (older callers)


def _batches(ds, batch_size: int, limit: int | None = None):
    n = len(ds) if limit is None else min(limit, len(ds))
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        yield torch.stack(ds.__getitems__(idx)) if hasattr(ds, "__getitems__") else torch.stack([ds[i] for i in idx])


def pca_baseline(train: np.ndarray, test: np.ndarray, n_components: int, image_shape: tuple | None = None) -> dict:
    """Reconstruction error of PCA (fit on train) keeping n_components dimensions; with
    `image_shape` also its SSIM."""
    k = min(n_components, train.shape[0], train.shape[1])
    # Exact PCA (what sklearn's svd_solver="full" computes), in float64 with numpy's SVD:
    # importing sklearn would cost this job about as much as importing torch.
    mean = train.mean(0, dtype=np.float64)
    basis = np.linalg.svd(train - mean, full_matrices=False)[2][:k]
    rec = np.clip((test - mean) @ basis.T @ basis + mean, 0, 1).astype(test.dtype)
    mse = float(((rec - test) ** 2).mean())
    out = {"components": int(k), "mse": mse, "l1": float(np.abs(rec - test).mean()), "psnr": M.psnr(mse)}
    if image_shape is not None:
        shape = (-1, *image_shape)
        out["ssim"] = float(M.ssim_per_image(torch.from_numpy(rec).view(shape), torch.from_numpy(test).view(shape)).mean())
    return out


# ----------------------------------------------------------------------------- model adapters


def _param(model) -> torch.Tensor:
    return next(model.parameters())


def decode_fn(model):
    """(decode(z) -> decoder output, output kind): Bernoulli logits when the model offers
    `decode_logits`, else the decoder mean in [0, 1] (not clipped)."""
    p = _param(model)
    if hasattr(model, "decode_logits"):
        return (lambda z: model.decode_logits(z.to(p.dtype)).float()), "logits"
    signed = getattr(model, "input_range", "signed") == "signed"

    def mean(z):
        out = model.decode_latent(z.to(p.dtype)).float()
        return (out + 1) / 2 if signed else out

    return mean, "mean"


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


def lpips_scorer(net: str = "alex"):
    """(score(rec, x) -> per-image LPIPS, info) or (None, info saying why not). Never a random
    backbone: without the torchvision weights file LPIPS is reported as unavailable."""
    from vaeflow.losses.perceptual import PerceptualWeightsMissing, check_lpips_weights

    try:
        check_lpips_weights(net)
        import lpips  # noqa: F401
        from vaeflow.losses.perceptual import PerceptualLoss

        module = PerceptualLoss(net).lpips
    except PerceptualWeightsMissing as exc:
        return None, {"available": False, "net": net, "reason": str(exc)}
    except Exception as exc:  # lpips missing or broken
        return None, {"available": False, "net": net, "reason": f"{type(exc).__name__}: {exc}"}
    return _lpips_per_image(module), {"available": True, "net": net}


def _lpips_per_image(module):
    """Wrap an `lpips.LPIPS`-like module (inputs in [-1, 1], [B, 3, H, W] -> [B, 1, 1, 1]) as
    per-image scores of [0, 1] images. Grayscale is repeated to RGB; images smaller than 32
    pixels are upsampled (bilinear) to 64 so AlexNet/VGG feature maps stay non-empty;
    volumes are scored per slice and averaged."""

    def score(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if x.dim() == 5:
            d = x.shape[2]
            return score(rec.transpose(1, 2).flatten(0, 1), x.transpose(1, 2).flatten(0, 1)).view(b, d).mean(1)
        if x.shape[1] == 1:
            rec, x = rec.repeat(1, 3, 1, 1), x.repeat(1, 3, 1, 1)
        if min(x.shape[-2:]) < 32:
            rec = torch.nn.functional.interpolate(rec, size=(64, 64), mode="bilinear", align_corners=False)
            x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        return module(rec.float() * 2 - 1, x.float() * 2 - 1).flatten(1).mean(1).double()

    return score


# ----------------------------------------------------------------------------- likelihood


def choose_likelihood(model, recon_type: str | None, eval_cfg: dict, levels: int, fit_sigma) -> M.Likelihood:
    """The likelihood for ELBO/NLL numbers.

    auto: Bernoulli for a BCE-trained stage or a unit-range (sigmoid) model; otherwise a
    discretized Gaussian over the data's `levels` (256 for uint8) with a fixed sigma.
    sigma: `evaluation.likelihood_sigma`, or when null the RMS error of one posterior sample's
    decoder mean on the validation split (the maximum-likelihood fixed sigma, fit off test).
    """
    kind = eval_cfg.get("likelihood", "auto")
    if kind == "auto":
        unit = getattr(model, "input_range", "signed") == "unit"
        kind = "bernoulli" if (recon_type in ("bce", "bce_focal") or unit) else "discretized_gaussian"
    if kind == "bernoulli":
        return M.Likelihood("bernoulli")
    sigma = eval_cfg.get("likelihood_sigma")
    if sigma is None:
        sigma, source = fit_sigma()
    else:
        source = "evaluation.likelihood_sigma"
    bins = levels if kind == "discretized_gaussian" else None
    return M.Likelihood(kind, sigma=float(sigma), bins=bins, sigma_source=source)


@torch.no_grad()
def fit_sigma(model, ds, batch_size: int, generator: torch.Generator, limit: int = 2000) -> float:
    """RMS error between images and the decoder mean at one posterior sample (floored at 1e-3)."""
    decode, kind = decode_fn(model)
    sq, n = 0.0, 0
    for x in _batches(ds, batch_size, limit):
        out = model.ae_forward(_to_model_range(x, model).to(_param(model).dtype), sample_posterior=False)
        post = out.posterior
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator).to(post.mean)
        mean = decode(z)
        mean = torch.sigmoid(mean) if kind == "logits" else mean
        sq += float((mean.double() - x.double()).pow(2).sum())
        n += x.numel()
    return max(math.sqrt(sq / max(n, 1)), 1e-3)


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
    """Every test-split metric of one model (already in eval mode, on CPU or its device)."""
    cfg = {**EVAL_DEFAULTS, **(eval_cfg or {})}
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
    code_counts = None
    lpips_fn, lpips_info = lpips_scorer(cfg["lpips_net"])
    vq_batch_stats: dict[str, list[float]] = {}
    image_shape = None
    for x in _batches(test_ds, bs):
        image_shape = tuple(x.shape[1:])
        xm = _to_model_range(x, model).to(device)
        out = model.ae_forward(xm, sample_posterior=False)
        rec = _to_unit(out.recon.float(), model).cpu()
        sse += float((rec.double() - x.double()).pow(2).sum())
        sae += float((rec.double() - x.double()).abs().sum())
        n_pix += x.numel()
        n_img += x.shape[0]
        psnrs.append(M.psnr_per_image(rec, x))
        ssims.append(M.ssim_per_image(rec, x))
        if lpips_fn is not None:
            lpips_vals.append(lpips_fn(rec.to(device), x.to(device)).cpu())
        is_kl = out.posterior is not None
        deterministic = is_kl and bool(getattr(out.posterior, "deterministic", False))
        if is_kl:
            kl_sum += float(M.kl_std_normal(out.posterior.mean, out.posterior.logvar).sum())
            moments.add(out.posterior.mean)
        else:
            moments.add(model.encode_latent(xm))
            codes = code_indices(model, xm)
            if codes is not None:
                idx, size = codes
                c = torch.bincount(idx.reshape(-1).cpu(), minlength=size)
                code_counts = c if code_counts is None else code_counts + c
            for k, v in (out.stats or {}).items():
                vq_batch_stats.setdefault(k, []).append(float(v))
    if n_img == 0:
        raise ValueError("evaluation: the test split is empty")
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
        "active_units": {
            "count": M.active_units(variances, cfg["active_unit_threshold"]),
            "of": latent_dims,
            "threshold": cfg["active_unit_threshold"],
            "statistic": "variance over test images of the " + ("posterior mean" if is_kl else "quantized latent"),
        },
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
        res["nll"] = _nll_section(model, test_ds, val_ds or train_ds, cfg, recon_type, levels, dims, gen, log)

    if train_ds is not None and len(train_ds):
        flat = lambda ds: np.concatenate([b.flatten(1).numpy() for b in _batches(ds, 1024)])
        res["pca"] = pca_baseline(flat(train_ds), flat(test_ds), latent_dims, image_shape)
        res["beats_pca"] = res["mse"] < res["pca"]["mse"]
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _nll_section(model, test_ds, sigma_ds, cfg, recon_type, levels, dims, gen, log) -> dict:
    k = int(cfg["iw_samples"])
    if sigma_ds is None:  # no held-out data given (library use): say so
        sigma_ds, where = test_ds, "the test split itself (no validation data was given)"
    else:
        where = f"the {getattr(sigma_ds, 'split', 'held-out')} split"
    lik = choose_likelihood(
        model, recon_type, cfg, levels,
        lambda: (fit_sigma(model, sigma_ds, cfg["batch_size"], gen), f"fitted on {where} (RMS error at one posterior sample)"),
    )
    decode, kind = decode_fn(model)
    limit = cfg["nll_max_images"]
    img_bs = max(1, min(cfg["batch_size"], 64))
    chunk = max(1, cfg["batch_size"] * 4 // img_bs)
    sums = {"neg_elbo": 0.0, "neg_elbo_mc": 0.0, "iw_nll": 0.0, "recon_nll": 0.0, "kl": 0.0}
    n = 0
    device = _param(model).device
    for x in _batches(test_ds, img_bs, limit):
        post = model.ae_forward(_to_model_range(x, model).to(device), sample_posterior=False).posterior
        log_lik = M.decoder_log_lik(decode, lik, x.to(device), kind)
        est = M.elbo_and_iw_nll(post.mean, post.logvar, log_lik, k, chunk=chunk,
                                generator=gen if device.type == "cpu" else None)
        for key in sums:
            sums[key] += float(est[key].sum())
        n += x.shape[0]
    mean = {key: v / n for key, v in sums.items()}
    return {
        "likelihood": lik.describe(),
        "images": n,
        "iw_samples": k,
        "neg_elbo_nats": mean["neg_elbo"],
        "neg_elbo_bpd": M.bits_per_dim(mean["neg_elbo"], dims),
        "iw_nll_nats": mean["iw_nll"],
        "iw_nll_bpd": M.bits_per_dim(mean["iw_nll"], dims),
        "recon_nll_nats": mean["recon_nll"],
        "kl_nats": mean["kl"],
        "neg_elbo_same_samples_nats": mean["neg_elbo_mc"],
        "note": (
            "neg_elbo = E_q[-log p(x|z)] (MC over the iw_samples draws) + analytic KL(q||N(0,I)); "
            f"iw_nll = -log (1/k) sum_k p(x,z_k)/q(z_k|x), k={k} (Burda et al. 2015); per image, averaged"
        ),
    }


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
                        eval_cfg: dict | None = None, seed: int | None = None, log=print) -> dict:
    from vaeflow.config import resolve_steps
    from vaeflow.data import PreparedDataset

    model, state = load_autoencoder(checkpoint)
    cfg = {**EVAL_DEFAULTS, **(eval_cfg or {})}
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
    parts = [f"{stage}: test MSE {m['mse']:.5f} (PSNR {_fmt(m.get('psnr'), '.2f')} dB, SSIM {m['ssim']:.4f})"]
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


def _fmt(v, spec: str) -> str:
    return "inf" if v is None else format(v, spec)
