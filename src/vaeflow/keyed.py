"""Random draws that belong to a sample, not to a process.

A draw keyed by (seed, stage, epoch, dataset index, draw number) is the same whichever rank
reads the sample, however its batch is split into micro-batches or accumulation windows,
and after any resume or rollback: it is a pure function of the key, like the data order
(trainer/batches.py). Dynamic binarization and the trainer's posterior noise use it, so
"2 processes equal 1", "splitting a batch changes no gradient" and "resume is bit-exact"
hold with both on.
"""

from __future__ import annotations

import hashlib
import struct

import torch


def key_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (blake2b: nearby keys give unrelated seeds)."""
    data = struct.pack(f"<{len(parts)}q", *(int(p) for p in parts))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from the key."""
    return torch.Generator().manual_seed(key_seed(*parts))


def normal_rows(prefix: tuple[int, ...], rows, row_shape, device, dtype) -> torch.Tensor:
    """[len(rows), *row_shape] standard normal noise; row j drawn from key (*prefix, rows[j])."""
    out = torch.empty((len(rows), *row_shape))
    for j, r in enumerate(rows):
        out[j] = torch.randn(row_shape, generator=generator(*prefix, int(r)))
    return out.to(device=device, dtype=dtype)


def bernoulli_rows(prefix: tuple[int, ...], rows, probs: torch.Tensor) -> torch.Tensor:
    """Bernoulli(probs[j]) per row, row j drawn from key (*prefix, rows[j])."""
    out = torch.empty_like(probs)
    for j, r in enumerate(rows):
        out[j] = torch.bernoulli(probs[j], generator=generator(*prefix, int(r)))
    return out
