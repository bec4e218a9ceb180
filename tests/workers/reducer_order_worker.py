"""Generator and discriminator reducers when a generator parameter is unused on rank 1
(tests/invariants/test_two_processes.py). Under torchrun with 2 ranks:

    reducer_order_worker.py OUT own|shared

Layer b feeds the generator's loss on rank 0 only, so rank 1's generator buckets wait for
finish(), while the discriminator's start during its backward. Saves, per rank, the
averaged gradients and the expected ones (each rank's local gradients, averaged).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from vaeflow import collectives
from vaeflow.trainer.distributed import Dist, init_from_env


def main(out: str, groups: str) -> None:
    init_from_env({"backend": "gloo", "timeout_s": 20})
    dist = Dist()
    torch.manual_seed(0)
    a, b, d = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)
    gen, disc = [*a.parameters(), *b.parameters()], list(d.parameters())
    x = torch.arange(8.0).view(2, 4) * (dist.rank + 1)

    def backward_g():
        h = a(x)
        if dist.rank == 0:
            h = b(h)
        h.pow(2).sum().backward()

    def backward_d():
        d(x).sum().backward()

    # expected: every rank's local gradients (a missing one counts as zero), averaged
    backward_g()
    backward_d()
    local = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in gen + disc]
    every = collectives.all_gather_object(local)
    expected = [sum(g[i] for g in every) / dist.world for i in range(len(local))]
    for p in gen + disc:
        p.grad = None

    own = groups == "own"  # the trainer's way (TrainStep); "shared": one group for both (the defect)
    tiny = 2**-30  # MB: one bucket per parameter, so buckets start one by one during backward
    rg = dist.reducer(gen, bucket_mb=tiny, own_group=own)
    rd = dist.reducer(disc, bucket_mb=tiny, own_group=own)
    rg.arm()
    backward_g()
    rd.arm()
    backward_d()
    rg.finish()
    rd.finish()
    got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in gen + disc]
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save({"got": got, "expected": expected}, Path(out) / f"rank{dist.rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
