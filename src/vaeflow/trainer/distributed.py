"""Data parallelism over torch.distributed, for `training.distributed` with more than one process.

`vaeflow train` relaunches itself under torchrun (`vaeflow.trainer.launch`); each rank
trains on its slice of every global batch, gradients are averaged across ranks before each
optimizer step (bucketed and overlapped with backward, `grad_sync.GradReducer`), BatchNorm
buffers follow rank 0, metrics are averaged, and only rank 0 writes checkpoints, logs and
samples (inside `rank_local`, where a collective is an error, not a hang).

Every collective goes through `vaeflow.collectives` (device checks, one-line errors naming
the rank). The process group serves CPU and CUDA (`cpu:gloo,cuda:nccl` on CUDA machines)
and times out after `training.distributed.timeout_s`.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from vaeflow import collectives
from vaeflow.trainer.grad_sync import BUCKET_MB, GradReducer


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


def init_from_env(dcfg: dict) -> bool:
    """Join the process group torchrun describes in the environment.

    dcfg is `training.distributed` (backend, timeout_s). Returns True if this call created
    the group (the caller then destroys it); False when single-process or when the caller
    (a library user, a test) had already set one up.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    _die_with_launcher()
    timeout_s = dcfg["timeout_s"]
    collectives.configure(timeout_s=timeout_s)
    cuda = torch.cuda.is_available()
    if cuda:  # before the group exists, so nccl binds each rank to its own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(collectives.backend_string(dcfg["backend"], cuda),
                            timeout=timedelta(seconds=timeout_s))
    collectives.configure(diagnosis_group=dist.new_group(backend="gloo"))  # names unresponsive ranks
    return True


def _coalesced_broadcast(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values into every rank's tensors, one broadcast per dtype."""
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors([t.data for t in group])
        collectives.broadcast(flat, 0)
        for t, synced in zip(group, _unflatten_dense_tensors(flat, group)):
            t.data.copy_(synced)


class Dist:
    """The current rank's view of the group; every method is a no-op when single-process."""

    def __init__(self, device: torch.device | None = None):
        self.enabled = collectives.active()
        self.rank = collectives.rank()
        self.world = collectives.world()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.grad_group = collectives.new_group()  # the buckets' own ordering of collectives
        self.set_device(device)

    def set_device(self, device: torch.device | None) -> None:
        """The training device: every collective tensor is made (or must be) there."""
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.enabled:
            collectives.configure(device=self.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rank_local(self, what: str):
        """Context for code only rank 0 runs: any collective inside is an error, not a hang."""
        return collectives.rank_local(what)

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch."""
        if not self.enabled:
            return indices
        if len(indices) % self.world:
            raise ValueError(
                f"training.batch_size must be divisible by the number of processes "
                f"({len(indices)} images over {self.world} processes)"
            )
        return indices.chunk(self.world)[self.rank]

    def reducer(self, params, overlap: bool = True, bucket_mb: float = BUCKET_MB, own_group: bool = False) -> GradReducer:
        """Bucketed gradient averaging for these parameters (hooks registered once). `own_group`:
        on a process group of its own (every rank must create its reducers in the same order),
        so its buckets pair up whatever another reducer's do meanwhile."""
        group = collectives.new_group() if own_group and self.enabled else self.grad_group
        return GradReducer(list(params), group, bucket_mb, overlap=overlap and self.enabled)

    def average_grads(self, params) -> None:
        """Average the gradients of params over the ranks now (zero-filling missing ones)."""
        if self.enabled:
            reducer = GradReducer(list(params), self.grad_group, overlap=False)
            reducer.finish()

    def broadcast_module(self, module: torch.nn.Module | None, buffers_only: bool = False) -> None:
        if not self.enabled or module is None:
            return
        tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
        if tensors:
            _coalesced_broadcast(tensors)

    def broadcast_norm_buffers(self, module: torch.nn.Module | None) -> None:
        """BatchNorm running statistics follow rank 0 (every other buffer is the same on
        every rank by construction: quantizer EMA statistics are all-reduced)."""
        if not self.enabled or module is None:
            return
        norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
        tensors = [b for m in norms for b in m.buffers()]
        if tensors:
            _coalesced_broadcast(tensors)

    def mean_dict(self, values: dict) -> dict:
        """Means over ranks of a dict of numbers, with one all-reduce on the training device."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        dtype = torch.float64 if self.device.type in ("cpu", "cuda") else torch.float32
        t = torch.tensor([float(values[k]) for k in keys], dtype=dtype, device=self.device)
        collectives.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def gather(self, obj) -> list:
        return collectives.all_gather_object(obj)

    def barrier(self) -> None:
        collectives.barrier()

    def check_agree(self, what: str, value) -> None:
        """Raise unless every rank holds the same value (e.g. the resume point)."""
        if not self.enabled:
            return
        values = self.gather(value)
        if any(v != values[0] for v in values):
            raise collectives.RanksDisagree(
                f"ranks disagree on {what}: {values}; every node must see the same results directory "
                "(a filesystem shared by all nodes)"
            )
