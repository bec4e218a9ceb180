"""The trainer's posterior noise: each sample's eps is keyed by (seed, stage, epoch, dataset
index, draw), through `vaeflow.keyed`. So micro-batching, gradient accumulation, data
parallelism and resume draw the same noise for the same sample (the invariants in
tests/invariants/), where a process-wide RNG stream would depend on all four."""

from __future__ import annotations

import torch

from vaeflow import keyed
from vaeflow.models.base import posterior_noise


class SampleNoise:
    """`for_rows(epoch, rows)`: a context in which posterior samples of a chunk whose rows
    are the dataset items `rows` draw keyed noise (draw 0, 1, ... per sample() call)."""

    def __init__(self, seed: int, stage_index: int):
        self.seed, self.stage_index = int(seed), int(stage_index)

    def for_rows(self, epoch: int, rows: torch.Tensor):
        rows = [int(r) for r in rows]
        draws = [0]

        def source(shape, device, dtype) -> torch.Tensor:
            if shape[0] != len(rows):
                raise ValueError(f"posterior noise for {shape[0]} samples, but the chunk holds {len(rows)}")
            prefix = (self.seed, self.stage_index, epoch, draws[0])
            draws[0] += 1
            return keyed.normal_rows(prefix, rows, tuple(shape[1:]), device, dtype)

        return posterior_noise(source)
