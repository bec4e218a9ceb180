"""The likelihood side of evaluation (KL models): the decoder likelihood p(x|z) chosen for
ELBO / NLL numbers, its sigma fitted on held-out data, and the negative ELBO and
importance-weighted NLL of the test split, streamed in batches on the model's device."""

from __future__ import annotations

import math

import torch

from vaeflow import metrics as M
from vaeflow.data.dataset import stack_items
from vaeflow.metrics import to_model_range as _to_model_range


DECODE_ELEMENTS = 1 << 21  # pixel values decoded per call of the IW-NLL estimate


def batches(ds, batch_size: int, limit: int | None = None):
    """[B, ...] CPU tensors of the first `limit` items (all when None), in order."""
    n = len(ds) if limit is None else min(limit, len(ds))
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        yield stack_items(ds, idx)


def first_param(model) -> torch.Tensor:
    return next(model.parameters())


def decode_fn(model):
    """(decode(z) -> decoder output, output kind): Bernoulli logits when the model offers
    `decode_logits`, else the decoder mean in [0, 1] (not clipped)."""
    p = first_param(model)
    if hasattr(model, "decode_logits"):
        return (lambda z: model.decode_logits(z.to(p.dtype)).float()), "logits"
    signed = model.input_range == "signed"

    def mean(z):
        out = model.decode_latent(z.to(p.dtype)).float()
        return (out + 1) / 2 if signed else out

    return mean, "mean"


def choose_likelihood(model, recon_type: str | None, eval_cfg: dict, levels: int, fit_sigma) -> M.Likelihood:
    """The likelihood for ELBO/NLL numbers.

    auto: Bernoulli for a BCE-trained stage or a unit-range (sigmoid) model; otherwise a
    discretized Gaussian over the data's `levels` (256 for uint8) with a fixed sigma.
    sigma: `evaluation.likelihood_sigma`, or when null the RMS error of one posterior sample's
    decoder mean on the validation split (the maximum-likelihood fixed sigma, fit off test).
    """
    kind = eval_cfg.get("likelihood", "auto")
    if kind == "auto":
        unit = model.input_range == "unit"
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
    p = first_param(model)
    for x in batches(ds, batch_size, limit):
        out = model.ae_forward(_to_model_range(x, model).to(p.device, p.dtype), sample_posterior=False)
        post = out.posterior
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator).to(post.mean)
        mean = decode(z)
        mean = torch.sigmoid(mean) if kind == "logits" else mean
        sq += float((mean.double() - x.to(mean.device).double()).pow(2).sum())
        n += x.numel()
    return max(math.sqrt(sq / max(n, 1)), 1e-3)


def nll_section(model, test_ds, sigma_ds, cfg, recon_type, levels, dims, gen, log) -> dict:
    """Negative ELBO and IW-NLL (nats and bits/dim per image) of the test split."""
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
    # Posterior samples decoded per call: at most DECODE_ELEMENTS pixel values, since the
    # likelihood's float64 temporaries scale with them (64 images x 16 samples of 64x64 RGB
    # took 1.5 GB); small images keep 4 x batch_size / img_bs samples per call.
    chunk = max(1, min(cfg["batch_size"] * 4 // img_bs, DECODE_ELEMENTS // (img_bs * dims)))
    sums = {"neg_elbo": 0.0, "neg_elbo_mc": 0.0, "iw_nll": 0.0, "recon_nll": 0.0, "kl": 0.0}
    n = 0
    device = first_param(model).device
    for x in batches(test_ds, img_bs, limit):
        post = model.ae_forward(_to_model_range(x, model).to(device), sample_posterior=False).posterior
        log_lik = M.decoder_log_lik(decode, lik, x.to(device), kind)
        est = M.elbo_and_iw_nll(post.mean, post.logvar, log_lik, k, chunk=chunk, generator=gen)
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
