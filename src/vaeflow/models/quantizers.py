"""Quantizers for the VQ models, written from the papers (no extra dependency).

All take a latent [B, C, *spatial] and return `(z_q, loss, info)`: `z_q` has the input's shape
and passes gradients straight through to the encoder, `loss` is the scalar regularisation term
(codebook + commitment (+ entropy)), `info` holds `indices` [B, *spatial] and float stats
(`perplexity`, `usage` = fraction of codes used in the batch, ...).

    VectorQuantizer   VQ-VAE (van den Oord et al.) with EMA codebook updates, dead-code restart
    LFQ               lookup-free quantization (MAGVIT-v2): sign bits, entropy loss
    FSQ               finite scalar quantization (Mentzer et al.): bounded, rounded channels
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vaeflow import collectives


def _flatten(z: torch.Tensor) -> torch.Tensor:
    """[B, C, *S] -> [B * prod(S), C]."""
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def _unflatten(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    shape = (like.shape[0], *like.shape[2:], flat.shape[-1])
    return flat.reshape(shape).movedim(-1, 1)


def code_stats(indices: torch.Tensor, codebook_size: int, pooled: bool = False) -> dict[str, float]:
    """Perplexity and usage of the codes in `indices`; `pooled`: over every rank's batch.

    Quantizers pool only in training mode, which every rank runs in step; in eval mode
    (validation, rank 0's sample grids) the statistics are this rank's own.
    """
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).float()
    if pooled:
        collectives.all_reduce(counts)
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
    usage = (counts > 0).float().mean()
    return {"perplexity": float(perplexity), "usage": float(usage)}


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook quantizer.

    loss = ||sg(z_q) - z||^2 * beta  (+ ||z_q - sg(z)||^2 when the codebook learns by gradient).
    With `ema=True` the codebook instead follows an exponential moving average of the encoder
    outputs assigned to each code (decay `decay`, Laplace smoothing `eps`). Codes whose EMA
    count falls below `dead_code_threshold` are restarted from random encoder outputs of the
    current batch (also at the first training step, which is a data-dependent init); set it
    to 0 to disable restarts. Distances and EMA statistics run in fp32.
    """

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25, ema: bool = True,
                 decay: float = 0.99, eps: float = 1e-5, dead_code_threshold: float = 1.0):
        super().__init__()
        self.codebook_size, self.code_dim = int(codebook_size), int(code_dim)
        self.beta, self.ema, self.decay, self.eps = float(beta), bool(ema), float(decay), float(eps)
        self.dead_code_threshold = float(dead_code_threshold)
        init = torch.empty(self.codebook_size, self.code_dim).uniform_(
            -1.0 / self.codebook_size, 1.0 / self.codebook_size)
        if self.ema:  # a buffer: no optimizer (or unfreezing) can touch it
            self.register_buffer("embed", init)
            self.register_buffer("cluster_size", torch.zeros(self.codebook_size))
            self.register_buffer("embed_sum", init.clone())
        else:
            self.embedding = nn.Embedding(self.codebook_size, self.code_dim)
            with torch.no_grad():
                self.embedding.weight.copy_(init)
        self.defer_ema = False
        self._pending: list[tuple] = []  # (counts, sums, vectors) per training forward since the last update

    @property
    def codebook(self) -> torch.Tensor:
        return self.embed if self.ema else self.embedding.weight

    def codes_to_latent(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, *S] indices -> [B, C, *S] code vectors."""
        return F.embedding(indices, self.codebook).movedim(-1, 1)

    def forward(self, z: torch.Tensor):
        flat = _flatten(z).float()
        e = self.codebook.float()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        idx = d.argmin(1)
        # z_q from the codebook the codes were chosen in: the EMA update comes after, so a code
        # restarted in this step never hands back its new random vector (taming, Sonnet alike)
        zq_flat = F.embedding(idx, e)
        if self.training and self.ema:
            self._pending.append(self._stats(flat, idx))
            if not self.defer_ema:
                self.commit_ema()
        zq = _unflatten(zq_flat, z).to(z.dtype)
        commit = F.mse_loss(z.float(), zq.detach().float())
        loss = self.beta * commit
        if not self.ema:
            loss = loss + F.mse_loss(zq.float(), z.detach().float())
        zq = z + (zq - z).detach()  # straight-through
        indices = idx.view(z.shape[0], *z.shape[2:])
        info = {"indices": indices, "commitment": float(commit.detach()),
                **code_stats(idx, self.codebook_size, pooled=self.training)}
        return zq, loss, info

    @torch.no_grad()
    def _stats(self, flat: torch.Tensor, idx: torch.Tensor) -> tuple:
        onehot = F.one_hot(idx, self.codebook_size).type_as(flat)
        return onehot.sum(0), onehot.t() @ flat, flat.detach()

    # The EMA codebook update of a training forward. With `defer_ema` (the trainer sets it)
    # the statistics wait for `commit_ema()` at the optimizer step: one update per step from
    # every micro-batch and accumulated batch of its window, dropped with `discard_ema()`
    # when the step is skipped, and cut back with `truncate_pending()` when a batch is
    # started over. Without it (a library user's loop), every training forward updates.
    def pending_mark(self) -> int:
        return len(self._pending)

    def truncate_pending(self, mark: int) -> None:
        del self._pending[mark:]

    def discard_ema(self) -> None:
        self._pending = []

    @torch.no_grad()
    def commit_ema(self) -> None:
        if not self._pending:
            return
        counts = torch.stack([c for c, _, _ in self._pending]).sum(0)
        sums = torch.stack([s for _, s, _ in self._pending]).sum(0)
        flats = [f for _, _, f in self._pending]
        self._pending = []
        collectives.all_reduce(counts)  # every rank's batch: the single-process update
        collectives.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_sum / smoothed.unsqueeze(1))
        if self.dead_code_threshold > 0:
            self._restart_dead(flats)

    @torch.no_grad()
    def _restart_dead(self, flats: list[torch.Tensor]) -> None:
        dead = self.cluster_size < self.dead_code_threshold  # the same on every rank
        if not bool(dead.any()):
            return
        # Candidates from the window's global batches (ranks hold contiguous slices, so each
        # gathered forward is the single-process batch), drawn by rank 0 and sent to every rank.
        flat = torch.cat([collectives.all_gather_cat(f) for f in flats])
        pick = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
        cand = flat[pick]
        if flat.shape[0] < self.codebook_size:  # few vectors: jitter the repeats apart
            cand = cand + 0.01 * cand.std() * torch.randn_like(cand)
        collectives.broadcast(cand, src=0)
        w = self.embed
        w.copy_(torch.where(dead[:, None], cand.to(w.dtype), w))
        self.cluster_size.copy_(torch.where(dead, torch.full_like(self.cluster_size,
                                                                  self.dead_code_threshold),
                                            self.cluster_size))
        self.embed_sum.copy_(torch.where(dead[:, None], w * self.dead_code_threshold,
                                         self.embed_sum))


class LFQ(nn.Module):
    """Lookup-free quantization (MAGVIT-v2, Yu et al. 2023).

    Each of the `code_dim = log2(codebook_size)` channels becomes one bit: q = sign(z) in
    {-1, +1} (times `scale`), index = sum_i [q_i > 0] 2^i. The loss is
    beta * ||z - sg(q)||^2 + entropy_weight * (E[H(p(.|z))] - diversity_gamma * H(E[p(.|z)]))
    with p(c|z) = softmax_c(2 * inv_temperature * <z, c>): confident per-position codes, spread
    over the codebook. The entropies are exact for codebooks up to `exact_entropy_max` codes;
    larger codebooks use the bit-factorised form (p factorises over bits, so the per-sample
    term stays exact and the codebook term becomes the sum of per-bit marginal entropies).
    """

    def __init__(self, codebook_size: int = 2 ** 10, beta: float = 0.25,
                 entropy_weight: float = 0.1, diversity_gamma: float = 1.0,
                 inv_temperature: float = 100.0, scale: float = 1.0,
                 exact_entropy_max: int = 4096):
        super().__init__()
        bits = math.log2(codebook_size)
        if bits != int(bits):
            raise ValueError(f"LFQ codebook_size must be a power of two, got {codebook_size}")
        self.codebook_size, self.code_dim = int(codebook_size), int(bits)
        self.beta, self.entropy_weight = float(beta), float(entropy_weight)
        self.diversity_gamma, self.inv_temperature = float(diversity_gamma), float(inv_temperature)
        self.scale, self.exact_entropy_max = float(scale), int(exact_entropy_max)
        self.register_buffer("bit_mask", 2 ** torch.arange(self.code_dim), persistent=False)

    @property
    def codebook(self) -> torch.Tensor:
        """All codes [K, code_dim] in {-scale, +scale} (built on demand)."""
        bits = (torch.arange(self.codebook_size, device=self.bit_mask.device)[:, None]
                & self.bit_mask) > 0
        return (bits.float() * 2 - 1) * self.scale

    def codes_to_latent(self, indices: torch.Tensor) -> torch.Tensor:
        bits = (indices[..., None] & self.bit_mask) > 0
        return ((bits.float() * 2 - 1) * self.scale).movedim(-1, 1)

    @staticmethod
    def _h(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return -(p * torch.log(p.clamp_min(1e-10))).sum(dim)

    def entropy_terms(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean per-sample entropy, codebook entropy), in nats."""
        if self.codebook_size <= self.exact_entropy_max:
            logits = 2 * self.inv_temperature * flat @ self.codebook.t()
            prob = logits.softmax(-1)
            per_sample = self._h(prob).mean()
            return per_sample, self._h(collectives.mean_differentiable(prob.mean(0)))
        p1 = torch.sigmoid(4 * self.inv_temperature * self.scale * flat)  # P(bit = +1)
        pb = torch.stack([p1, 1 - p1], -1)
        per_sample = self._h(pb).sum(-1).mean()
        return per_sample, self._h(collectives.mean_differentiable(pb.mean(0))).sum()

    def forward(self, z: torch.Tensor):
        if z.shape[1] != self.code_dim:
            raise ValueError(f"LFQ expects {self.code_dim} channels, got {z.shape[1]}")
        flat = _flatten(z).float()
        q = torch.where(flat > 0, self.scale, -self.scale)
        idx = ((q > 0).long() * self.bit_mask).sum(-1)
        commit = F.mse_loss(flat, q)
        loss = self.beta * commit
        stats = {"commitment": float(commit.detach())}
        if self.training and self.entropy_weight > 0:
            per_sample, cb = self.entropy_terms(flat)
            loss = loss + self.entropy_weight * (per_sample - self.diversity_gamma * cb)
            stats.update(per_sample_entropy=float(per_sample.detach()),
                         codebook_entropy=float(cb.detach()))
        zq = _unflatten(q, z).to(z.dtype)
        zq = z + (zq - z).detach()
        info = {"indices": idx.view(z.shape[0], *z.shape[2:]), **stats,
                **code_stats(idx, self.codebook_size, pooled=self.training)}
        return zq, loss, info


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023).

    Channel i is squashed to (levels_i - 1) / 2 * tanh(.) (shifted for even level counts),
    rounded with a straight-through estimator and rescaled to [-1, 1]. The implicit codebook
    has prod(levels) entries; there is no codebook or commitment loss (loss = 0).
    """

    def __init__(self, levels: Sequence[int] = (8, 5, 5, 5), eps: float = 1e-3):
        super().__init__()
        # Sizes in plain Python: the config check builds models on the meta device (no values).
        if any(int(x) < 2 for x in levels):
            raise ValueError(f"FSQ levels must be >= 2, got {list(levels)}")
        self.levels = tuple(int(x) for x in levels)
        self.code_dim = len(self.levels)
        self.codebook_size = math.prod(self.levels)
        lv = torch.tensor(self.levels, dtype=torch.long)
        self.eps = float(eps)
        self.register_buffer("_levels", lv.float(), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + list(self.levels[:-1])), 0)
        self.register_buffer("_basis", basis.long(), persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        half_l = (self._levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def codes_to_latent(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices[..., None] // self._basis) % self._levels.long()
        half = (self._levels // 2)
        return ((digits.float() - half) / half).movedim(-1, 1)

    def forward(self, z: torch.Tensor):
        if z.shape[1] != self.code_dim:
            raise ValueError(f"FSQ expects {self.code_dim} channels, got {z.shape[1]}")
        flat = _flatten(z).float()
        b = self.bound(flat)
        rounded = b + (torch.round(b) - b).detach()
        half = self._levels // 2
        q = rounded / half
        digits = (torch.round(b) + half).long()
        idx = (digits * self._basis).sum(-1)
        zq = _unflatten(q, z).to(z.dtype)
        info = {"indices": idx.view(z.shape[0], *z.shape[2:]),
                **code_stats(idx, self.codebook_size, pooled=self.training)}
        return zq, z.new_zeros((), dtype=torch.float32), info
