"""Gradient averaging across ranks: bucketed, and overlapped with the backward pass.

`GradReducer(params)` groups the parameters into buckets of about `bucket_mb` (in reverse
order, roughly the order backward produces their gradients, as DDP does). After `arm()`,
a `register_post_accumulate_grad_hook` on every parameter starts a bucket's all-reduce
(async) as soon as all its gradients are ready and every earlier bucket has started, so
communication runs while backward computes the rest. `finish()` starts whatever is left,
waits, and writes the averaged gradients back. Without `arm()`, `finish()` does it all at
once (gradient accumulation: only the last backward of a window arms).

A parameter whose gradient is None on some ranks (unused in this rank's graph) counts as
a zero gradient there; a presence flag per parameter travels in the same buffer, so a
parameter unused on *every* rank keeps grad None, as in a single process. Buckets start
in a fixed order on their own process group (one group per reducer: the generator's and
the discriminator's), so ranks whose graphs differ still pair up the same buckets,
whatever other collectives (a quantizer's autograd all-reduce, the other reducer's
buckets) run during backward.

The adaptive GAN weight (`torch.autograd.grad`) and R1 (double backward) do not
accumulate into `.grad`, so they do not trigger the hooks: this is why an explicit
reducer rather than DistributedDataParallel, whose reducer requires gradients to arrive
through `backward` only.
"""

from __future__ import annotations

import time

import torch

from vaeflow import collectives

BUCKET_MB = 25.0  # DDP's default bucket_cap_mb
FIRST_BUCKET_MB = 1.0  # as DDP: a small first bucket, so communication starts early in backward


def _buckets(params: list[torch.Tensor], cap_bytes: float) -> list[list[int]]:
    buckets: list[list[int]] = []
    current: list[int] = []
    size, key = 0, None
    for i in reversed(range(len(params))):
        p = params[i]
        k = (p.dtype, p.device)
        cap = min(cap_bytes, FIRST_BUCKET_MB * 2**20) if not buckets else cap_bytes
        if current and (k != key or size + p.numel() * p.element_size() > cap):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += p.numel() * p.element_size()
        key = k
    if current:
        buckets.append(current)
    return buckets


class GradReducer:
    def __init__(self, params, group=None, bucket_mb: float = BUCKET_MB, overlap: bool = True):
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.buckets = _buckets(self.params, bucket_mb * 2**20)
        self.bucket_of = {i: b for b, idx in enumerate(self.buckets) for i in idx}
        self.armed = False
        self.wait_seconds = 0.0  # time finish() spent waiting on communication (benchmarks)
        self._reset()
        self._hooks = []
        if overlap and collectives.active():
            for i, p in enumerate(self.params):
                self._hooks.append(p.register_post_accumulate_grad_hook(lambda _p, i=i: self._ready(i)))

    def _reset(self) -> None:
        self.pending = [len(b) for b in self.buckets]
        self.works: list = [None] * len(self.buckets)
        self.next = 0

    def arm(self) -> None:
        """The next backward is the last before the optimizer step: start buckets as they fill."""
        self._drain()
        self._reset()
        self.armed = True

    def _ready(self, i: int) -> None:
        if not self.armed:
            return
        b = self.bucket_of[i]
        self.pending[b] -= 1
        while self.next < len(self.buckets) and self.pending[self.next] == 0:
            self._launch(self.next)

    def _launch(self, b: int) -> None:
        params = [self.params[i] for i in self.buckets[b]]
        ref = params[0]
        parts = [p.grad.reshape(-1) if p.grad is not None else ref.new_zeros(p.numel()) for p in params]
        present = torch.tensor([p.grad is not None for p in params], dtype=ref.dtype, device=ref.device)
        flat = torch.cat([*parts, present])
        self.works[b] = (flat, collectives.all_reduce(flat, group=self.group, async_op=True))
        self.next = b + 1

    def _drain(self) -> None:
        for item in self.works:
            if item is not None:
                collectives.wait(item[1])
        self.works = [None] * len(self.buckets)

    def abort(self) -> None:
        """Forget a backward that was started over (wait for the buckets it launched: every
        rank launched the same ones)."""
        self.armed = False
        self._drain()
        self._reset()

    def finish(self) -> None:
        """Average every gradient over the ranks (start what is left, wait, write back)."""
        self.armed = False
        if not collectives.active() or not self.params:
            return
        while self.next < len(self.buckets):
            self._launch(self.next)
        t0 = time.perf_counter()
        for b, (flat, work) in enumerate(self.works):
            collectives.wait(work)
            self._write_back(b, flat)
        self.wait_seconds += time.perf_counter() - t0
        self._reset()

    def _write_back(self, b: int, flat: torch.Tensor) -> None:
        params = [self.params[i] for i in self.buckets[b]]
        world = collectives.world()
        present = flat[-len(params):]
        offset = 0
        for p, seen in zip(params, present.tolist()):
            n = p.numel()
            if seen:
                avg = flat[offset : offset + n].view_as(p).div_(world)
                if p.grad is None:
                    p.grad = avg.clone()
                else:
                    p.grad.copy_(avg)
            else:
                p.grad = None
            offset += n

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
