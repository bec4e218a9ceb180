"""Data parallelism over torch.distributed, for `training.distributed.nproc_per_node > 1`.

`vaeflow train` relaunches itself under torchrun; each rank trains on its slice of every
global batch, gradients are averaged across ranks before each optimizer step (the
all-reduce DistributedDataParallel performs), BatchNorm buffers follow rank 0, metrics
are averaged, and only rank 0 writes checkpoints, logs and samples.

The gradient all-reduce is explicit rather than the DDP wrapper's autograd hooks because
the adaptive GAN weight takes `torch.autograd.grad` of the decoder's last layer and the R1
penalty differentiates through the discriminator twice per step; DDP's reducer supports
neither (its documentation: gradients must be accumulated in `.grad` by `backward`).
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist


def _die_with_launcher() -> None:
    """torchrun starts workers in their own sessions, so killing the launcher (kill -9,
    a scheduler's time limit) would leave them training and writing checkpoints behind a
    rerun's back. Ask Linux to SIGKILL this worker when its launcher dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before we asked
        os._exit(1)


def init_from_env(backend: str = "auto") -> bool:
    """Join the process group torchrun describes in the environment. False if single-process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    _die_with_launcher()
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return True


class Dist:
    """The current rank's view of the group; every method is a no-op when single-process."""

    def __init__(self):
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch."""
        if not self.enabled:
            return indices
        if len(indices) % self.world:
            raise ValueError(
                f"training.batch_size must be divisible by training.distributed.nproc_per_node "
                f"({len(indices)} images over {self.world} processes)"
            )
        return indices.chunk(self.world)[self.rank]

    def average_grads(self, params) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if not self.enabled or not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    def broadcast_module(self, module: torch.nn.Module, buffers_only: bool = False) -> None:
        if not self.enabled or module is None:
            return
        tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
        for t in tensors:
            dist.broadcast(t.data, 0)

    def mean_dict(self, values: dict) -> dict:
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t)}

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()
