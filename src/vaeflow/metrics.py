"""Evaluation metrics as small pure functions on tensors.

Images are float tensors in [0, 1], `[B, C, H, W]` (or `[B, C, D, H, W]` for volumes);
per-image results are `[B]` tensors. Log-likelihoods are in nats, summed over every
pixel/channel of an image. Nothing here touches files, models or configs: `evaluate.py`
orchestrates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LOG2 = math.log(2.0)
LOG_2PI = math.log(2.0 * math.pi)

# ----------------------------------------------------------------------------- value ranges


def to_model_range(x: torch.Tensor, model) -> torch.Tensor:
    """[0, 1] images -> the model's input range ([-1, 1] for `input_range == "signed"`)."""
    return x * 2 - 1 if model.input_range == "signed" else x


def to_unit(x: torch.Tensor, model) -> torch.Tensor:
    """Model output -> [0, 1] images (clipped), the inverse of `to_model_range`."""
    return ((x + 1) / 2).clamp(0, 1) if model.input_range == "signed" else x.clamp(0, 1)


# ----------------------------------------------------------------------------- pixel metrics


def mse_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.double() - y.double()).pow(2).flatten(1).mean(1)


def l1_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.double() - y.double()).abs().flatten(1).mean(1)


def psnr(mse: float, data_range: float = 1.0) -> float:
    """10 log10(range^2 / MSE) in dB; +inf for identical images."""
    mse = float(mse)
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def psnr_per_image(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    return torch.tensor([psnr(m, data_range) for m in mse_per_image(x, y).tolist()], dtype=torch.float64)


def gaussian_window(size: int, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1D Gaussian of odd length `size`."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_window_size(height: int, width: int, win_size: int = 11) -> int:
    """11 (Wang et al. 2004), or the largest odd size that fits a smaller image."""
    size = min(win_size, height, width)
    return size if size % 2 else size - 1


SSIM_CHUNK = 1 << 16  # values per SSIM pass: float64 grouped convs need ~0.4 kB of temporaries per value


def ssim_per_image(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004): Gaussian window (sigma 1.5), population
    statistics, 'valid' windows only, averaged over channels. Matches
    `skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)`. Volumes are scored slice by slice along
    depth. Windows shrink to the image size for images smaller than 11 pixels.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() == 5:  # [B, C, D, H, W] -> slices
        b, c, d = x.shape[:3]
        per_slice = ssim_per_image(
            x.transpose(1, 2).flatten(0, 1), y.transpose(1, 2).flatten(0, 1), data_range, win_size, sigma, k1, k2
        )
        return per_slice.view(b, d).mean(1)
    if x.dim() != 4:
        raise ValueError(f"ssim: expected [B, C, H, W], got {tuple(x.shape)}")
    b, c, h, w = x.shape
    n = max(1, SSIM_CHUNK // (c * h * w))  # images per pass: bounds the float64 temporaries
    if b > n:
        return torch.cat([ssim_per_image(x[i:i + n], y[i:i + n], data_range, win_size, sigma, k1, k2)
                          for i in range(0, b, n)])
    x, y = x.double(), y.double()
    size = ssim_window_size(h, w, win_size)
    g = gaussian_window(size, sigma).to(x.device)
    kh = g.view(1, 1, size, 1).expand(c, 1, size, 1).contiguous()
    kw = g.view(1, 1, 1, size).expand(c, 1, 1, size).contiguous()

    def filt(t):  # the 2D Gaussian as two 1D passes (separable: same result, a fraction of the memory)
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


# ----------------------------------------------------------------------------- likelihoods


def bernoulli_log_prob(
    x: torch.Tensor, probs: torch.Tensor | None = None, logits: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """log p(x) under independent Bernoullis, summed per image (float64 result). Give `logits`
    (exact) or `probs` (clamped to [eps, 1 - eps], as the trainer's BCE does). Computed in
    the inputs' precision (float32 is ample for a sum of ~1e3 terms, and 3x faster)."""
    if logits is not None:
        x = x.to(logits.dtype)
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1).double()
    x = x.to(probs.dtype)
    p = probs.clamp(eps, 1 - eps)
    return (x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1).double()


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """Continuous N(mean, sigma^2) density per pixel, summed per image (a density: can exceed 0)."""
    x, mean = x.double(), mean.double()
    return (-0.5 * ((x - mean) / sigma) ** 2 - math.log(sigma) - 0.5 * LOG_2PI).flatten(1).sum(1)


def discretized_gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, sigma: float, bins: int = 256) -> torch.Tensor:
    """Probability mass of the observed integer level under N(mean, sigma^2), per pixel,
    summed per image. Data in [0, 1] on `bins` levels (k / (bins - 1)); each level owns the
    interval of width 1 / (bins - 1) around it, the first and last extend to -inf / +inf.
    A proper distribution over the levels, so the NLL is >= 0 and bits/dim <= log2(bins)
    for a sensible model."""
    x, mean = x.double(), mean.double()
    half = 0.5 / (bins - 1)
    normal = torch.distributions.Normal(mean, torch.full_like(mean, sigma))
    upper = torch.where(x >= 1 - half, torch.ones_like(x), normal.cdf(x + half))
    lower = torch.where(x <= half, torch.zeros_like(x), normal.cdf(x - half))
    mass = upper - lower
    # Far in a tail the cdf difference underflows: fall back to density * width there.
    log_mass = torch.where(
        mass > 1e-12,
        mass.clamp_min(1e-300).log(),
        normal.log_prob(x) + math.log(2 * half),
    )
    return log_mass.flatten(1).sum(1)


@dataclass
class Likelihood:
    """The decoder likelihood p(x|z) used for ELBO / NLL numbers, stated in metrics.json.

    kind: bernoulli | gaussian | discretized_gaussian. `sigma` (fixed, in [0, 1] pixel
    units) for the Gaussian kinds; `bins` for the discretized one.
    """

    kind: str
    sigma: float | None = None
    bins: int | None = None
    eps: float = 1e-6
    sigma_source: str | None = None

    def __post_init__(self):
        if self.kind not in ("bernoulli", "gaussian", "discretized_gaussian"):
            raise ValueError(f"likelihood must be bernoulli, gaussian or discretized_gaussian, got {self.kind!r}")
        if self.kind != "bernoulli" and not (self.sigma and self.sigma > 0):
            raise ValueError(f"{self.kind} likelihood needs a positive sigma, got {self.sigma!r}")
        if self.kind == "discretized_gaussian" and not (self.bins and self.bins >= 2):
            raise ValueError(f"discretized_gaussian needs bins >= 2, got {self.bins!r}")

    def log_prob(self, x: torch.Tensor, mean: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x | decoder output); `mean` in [0, 1] units (probabilities for Bernoulli)."""
        if self.kind == "bernoulli":
            return bernoulli_log_prob(x, probs=mean, logits=logits, eps=self.eps)
        if mean is None:
            mean = torch.sigmoid(logits)
        if self.kind == "gaussian":
            return gaussian_log_prob(x, mean, self.sigma)
        return discretized_gaussian_log_prob(x, mean, self.sigma, self.bins)

    def describe(self) -> dict:
        if self.kind == "bernoulli":
            return {"kind": "bernoulli", "probs_clamp_eps": self.eps,
                    "note": "independent Bernoulli per pixel, log-likelihood summed over pixels"}
        src = {"sigma_source": self.sigma_source} if self.sigma_source else {}
        if self.kind == "gaussian":
            return {"kind": "gaussian", "sigma": self.sigma, **src,
                    "note": "continuous Gaussian density with fixed sigma on [0, 1] pixel values (nats can be negative)"}
        return {"kind": "discretized_gaussian", "sigma": self.sigma, "bins": self.bins, **src,
                "note": f"Gaussian with fixed sigma integrated over each of {self.bins} pixel levels (a probability mass)"}


# ----------------------------------------------------------------------------- ELBO and IW-NLL


def log_normal_diag(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(logvar))) summed over every non-batch dimension."""
    return (-0.5 * (LOG_2PI + logvar + (z - mean) ** 2 / logvar.exp())).flatten(1).sum(1)


def log_std_normal(z: torch.Tensor) -> torch.Tensor:
    return (-0.5 * (LOG_2PI + z**2)).flatten(1).sum(1)


def kl_std_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per image, in nats."""
    mean, logvar = mean.double(), logvar.double()
    return (0.5 * (mean**2 + logvar.exp() - 1.0 - logvar)).flatten(1).sum(1)


def bits_per_dim(nats: float | torch.Tensor, dims: int):
    """Nats per image -> bits per dimension (pixel x channel)."""
    return nats / (dims * LOG2)


@torch.no_grad()
def elbo_and_iw_nll(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    log_lik: Callable[[torch.Tensor], torch.Tensor],
    k: int,
    chunk: int = 64,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image negative ELBO and importance-weighted NLL (Burda et al. 2015) in nats.

    `mean`, `logvar`: the posterior q(z|x) of B images, `[B, *latent]`; prior N(0, I).
    `log_lik(z)`: log p(x|z) `[n, B]` for latents `z` of shape `[n, B, *latent]` (n samples
    for each image; see `decoder_log_lik`).
    With k samples z_i ~ q(z|x) and log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x):

      neg_elbo   = -mean_i log p(x|z_i) + KL(q || p)       (analytic KL, MC reconstruction)
      iw_nll     = -(logsumexp_i log w_i - log k)           (-> -log p(x) as k grows)
      neg_elbo_mc = -mean_i log w_i                          (the same samples' ELBO: iw_nll <= it)

    Samples are drawn in chunks of `chunk` to bound memory, on the generator's device (a CPU
    generator gives the same draws whatever device the model is on).
    """
    mean, logvar = mean.double(), logvar.double()
    std = (0.5 * logvar).exp()
    b = mean.shape[0]
    lse = torch.full((b,), -math.inf, dtype=torch.float64, device=mean.device)
    sum_ll = torch.zeros(b, dtype=torch.float64, device=mean.device)
    sum_logw = torch.zeros(b, dtype=torch.float64, device=mean.device)
    done = 0
    while done < k:
        n = min(chunk, k - done)
        eps = torch.randn((n, *mean.shape), generator=generator, dtype=torch.float64,
                          device=generator.device if generator is not None else mean.device).to(mean.device)
        z = mean[None] + std[None] * eps  # [n, B, *latent]
        z_flat = z.flatten(0, 1)
        m_flat = mean[None].expand_as(z).flatten(0, 1)
        lv_flat = logvar[None].expand_as(z).flatten(0, 1)
        ll = log_lik(z).double()  # [n, B]
        logw = ll + (log_std_normal(z_flat) - log_normal_diag(z_flat, m_flat, lv_flat)).view(n, b)
        lse = torch.logaddexp(lse, torch.logsumexp(logw, 0))
        sum_ll += ll.sum(0)
        sum_logw += logw.sum(0)
        done += n
    kl = kl_std_normal(mean, logvar)
    return {
        "neg_elbo": -(sum_ll / k) + kl,
        "neg_elbo_mc": -(sum_logw / k),
        "iw_nll": -(lse - math.log(k)),
        "recon_nll": -(sum_ll / k),
        "kl": kl,
    }


def decoder_log_lik(
    decode: Callable[[torch.Tensor], torch.Tensor], likelihood: Likelihood, x: torch.Tensor, output: str = "mean"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`log_lik` for `elbo_and_iw_nll`: decodes `[n, B, *latent]` in one call and scores it
    against the B images `x` ([0, 1]). `decode(z) -> mean in [0, 1]` (output="mean") or
    Bernoulli logits (output="logits")."""

    def log_lik(z: torch.Tensor) -> torch.Tensor:
        n, b = z.shape[:2]
        out = decode(z.flatten(0, 1))
        xr = x[None].expand(n, *x.shape).flatten(0, 1)
        return likelihood.log_prob(xr, **{output: out}).view(n, b)

    return log_lik


# ----------------------------------------------------------------------------- latents


class RunningMoments:
    """Per-dimension mean and (population) variance over a stream of `[B, D]` batches (float64)."""

    def __init__(self):
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().double().flatten(1).cpu()
        if self.sum is None:
            self.sum, self.sumsq = torch.zeros(v.shape[1], dtype=torch.float64), torch.zeros(v.shape[1], dtype=torch.float64)
        self.sum += v.sum(0)
        self.sumsq += (v * v).sum(0)
        self.n += v.shape[0]

    def variance(self) -> torch.Tensor:
        m = self.sum / self.n
        return (self.sumsq / self.n - m * m).clamp_min(0)


def active_units(variances: torch.Tensor, threshold: float = 0.01) -> int:
    """Burda et al. 2015: unit u is active if Cov_x(E_q[u | x]) > threshold (default 1e-2)."""
    return int((variances > threshold).sum())


def codebook_stats(counts: torch.Tensor) -> dict:
    """Usage (fraction of codes used at least once) and perplexity exp(H(p)) of code counts."""
    counts = counts.double()
    total = counts.sum()
    p = counts / total.clamp_min(1)
    nz = p[p > 0]
    return {
        "codebook_size": int(counts.numel()),
        "codes_used": int((counts > 0).sum()),
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
    }


class LatentMoments:
    """Per-channel and overall mean / std of latents `[B, C, *spatial]` over a stream of batches
    (float64 sums), and the diffusion normalisation they fit (SD3 / FLUX): a diffusion model
    trains on `scaling_factor * (z - shift_factor)` with `shift_factor` the mean and
    `scaling_factor` 1 / std of every latent element, so its inputs have mean 0 and std 1."""

    def __init__(self):
        self.n = 0  # elements per channel
        self.images = 0
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    def add(self, z: torch.Tensor) -> None:
        v = z.detach().double().movedim(1, 0).flatten(1).cpu()  # [C, B * spatial]
        if self.sum is None:
            self.sum = torch.zeros(v.shape[0], dtype=torch.float64)
            self.sumsq = torch.zeros(v.shape[0], dtype=torch.float64)
        self.sum += v.sum(1)
        self.sumsq += (v * v).sum(1)
        self.n += v.shape[1]
        self.images += z.shape[0]

    def result(self) -> dict:
        mean_c = self.sum / self.n
        std_c = (self.sumsq / self.n - mean_c * mean_c).clamp_min(0).sqrt()
        mean = float(self.sum.sum() / (self.n * len(self.sum)))
        var = float(self.sumsq.sum() / (self.n * len(self.sum))) - mean * mean
        std = math.sqrt(max(var, 0.0))
        return {"images": self.images, "channels_mean": [float(x) for x in mean_c],
                "channels_std": [float(x) for x in std_c], "mean": mean, "std": std,
                "shift_factor": mean, "scaling_factor": 1.0 / std if std > 0 else None}
