"""Every collective vaeflow issues goes through this module, so three rules hold everywhere.

1. Every rank issues the same collectives in the same order. Code that only some ranks run
   (rank 0 writing sample grids or checkpoints) runs inside `rank_local()`, where a
   collective raises `CollectiveMisuse` at once instead of leaving the other ranks waiting
   (the VQ hang: rank 0 all-reduced codebook statistics inside its sample grids while
   rank 1 waited in `all_gather_object`).
2. Every collective's tensor sits on the device the trainer declared with `expect_device`
   (the training device; nccl serves it on CUDA). A CPU tensor in a CUDA run is a
   `CollectiveMisuse` naming the operation, never an NCCL crash or a silent slow copy.
3. A failed or timed-out collective raises `CollectiveError` naming this rank, the
   operation and `training.distributed.timeout_s`, so a dead or stuck peer ends the job
   with one message instead of a silent hang.

The process group serves CPU and CUDA tensors (`cpu:gloo,cuda:nccl` on CUDA machines, see
`backend_string`): object collectives run on CPU through gloo, tensors on the device.
`observe(fn)` registers fn(op, tensors) called before every collective (tests record
them). Single-process, every function is a cheap no-op.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

_state = {"device": None, "local": [], "timeout_s": None, "diagnosis": None, "vote": None, "voting": False}
_observers: list[Callable] = []


class CollectiveMisuse(RuntimeError):
    """A collective that would hang or crash on some backend: a bug in the caller."""


class CollectiveError(RuntimeError):
    """A collective failed: a peer died, stalled past the timeout, or the network broke."""


class RanksDisagree(CollectiveError):
    """Ranks that must agree (on the resume point, say) do not."""


class PeerOutOfMemory(RuntimeError):
    """Another rank ran out of memory in this batch: every rank starts the batch over together."""


def backend_string(backend: str, cuda: bool) -> str:
    """The init_process_group backend for `training.distributed.backend`.

    auto and nccl on a CUDA machine: one group, nccl for CUDA tensors and gloo for CPU ones
    (object collectives and anything a library keeps on the host). Otherwise gloo.
    """
    if backend == "nccl" or (backend == "auto" and cuda):
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def configure(device: torch.device | str | None = None, timeout_s: float | None = None,
              diagnosis_group=None) -> None:
    """Declare the training device (collective tensors must live there), the timeout, and a
    gloo group kept for naming the ranks that stopped answering (`dist.monitored_barrier`)."""
    if device is not None:
        _state["device"] = torch.device(device)
    if timeout_s is not None:
        _state["timeout_s"] = timeout_s
    if diagnosis_group is not None:
        _state["diagnosis"] = diagnosis_group


def expected_device() -> torch.device | None:
    return _state["device"]


def observe(fn: Callable) -> Callable[[], None]:
    """Call fn(op, tensors) before every collective; returns a function that unregisters it."""
    _observers.append(fn)
    return lambda: _observers.remove(fn)


@contextlib.contextmanager
def rank_local(what: str) -> Iterator[None]:
    """Mark code that only some ranks run: a collective inside it is a CollectiveMisuse."""
    _state["local"].append(what)
    try:
        yield
    finally:
        _state["local"].pop()


def where() -> str:
    host = socket.gethostname()
    return f"rank {rank()} of {world()} (host {host}, pid {os.getpid()})"


def _same_device(t: torch.Tensor, want: torch.device) -> bool:
    have = t.device
    return have.type == want.type and (want.index is None or have.index == want.index)


def _check(op: str, tensors: list[torch.Tensor]) -> None:
    if _state["local"]:
        raise CollectiveMisuse(
            f"{where()}: {op} inside code only this rank runs ({_state['local'][-1]}); "
            "the other ranks would wait for it forever"
        )
    want = _state["device"]
    for t in tensors:
        if want is not None and not _same_device(t, want):
            raise CollectiveMisuse(
                f"{where()}: {op} of a {t.dtype} tensor on {t.device}, but collectives run on the "
                f"training device {want} (the backend that serves it may not accept {t.device})"
            )
    for fn in list(_observers):
        fn(op, tensors)


def _missing_ranks() -> str:
    """After a failed collective: which ranks still answer? Rank 0 learns who does not."""
    group = _state["diagnosis"]
    if group is None:
        return ""
    secs = min(10.0, _state["timeout_s"] or 10.0)
    try:
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=secs), wait_all_ranks=True)
    except RuntimeError as exc:
        found = re.search(r"Ranks? ([0-9][0-9, ]*) failed to pass monitoredBarrier", str(exc))
        if found:
            return f"; rank(s) {found.group(1).strip()} did not answer within {secs:g} s: stuck or dead"
        if rank() != 0 and "Timed out" in str(exc):
            return "; rank 0 did not confirm that every rank answers: it or another rank is stuck"
        return ""
    return "; every rank answers again: one was slower than the timeout"


def _failed(op: str, exc: BaseException) -> CollectiveError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    timeout = _state["timeout_s"]
    hint = f"training.distributed.timeout_s={timeout:g}" if timeout is not None else "the process group's timeout"
    return CollectiveError(
        f"{where()}: {op} failed ({first}){_missing_ranks()}. Another rank has died, is stuck past {hint}, "
        "or the network between the ranks failed"
    )


def _run(op: str, tensors: list[torch.Tensor], fn: Callable):
    _check(op, tensors)
    if _state["voting"]:
        vote_oom(False)
    try:
        return fn()
    except (RuntimeError, dist.DistError) as exc:
        raise _failed(op, exc) from exc


def wait(work, op: str = "all_reduce") -> None:
    """Wait for an async collective (from `all_reduce(..., async_op=True)`)."""
    try:
        work.wait()
    except (RuntimeError, dist.DistError) as exc:
        raise _failed(op, exc) from exc


def all_reduce(t: torch.Tensor, group=None, async_op: bool = False):
    """Sum over ranks, in place. With async_op, returns the Work to `wait` on."""
    if not active():
        return None
    return _run("all_reduce", [t], lambda: dist.all_reduce(t, group=group, async_op=async_op))


def mean_differentiable(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks as part of the autograd graph: its backward all-reduces the
    gradient, so a loss on the pooled value gets the gradient of the whole global batch."""
    if not active():
        return t
    return _AllReduceSum.apply(t) / world()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradient over ranks: both directions go through
    `all_reduce`, so both are checked and, inside `oom_votes`, voted on."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        all_reduce(grad)
        return grad


def broadcast(t: torch.Tensor, src: int = 0) -> None:
    if active():
        _run("broadcast", [t], lambda: dist.broadcast(t, src))


def all_gather_object(obj) -> list:
    """Every rank's obj (pickled, through the group's CPU backend)."""
    if not active():
        return [obj]
    out = [None] * world()
    _run("all_gather_object", [], lambda: dist.all_gather_object(out, obj))
    return out


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's t (same shape on each) concatenated along dim 0, in rank order."""
    if not active():
        return t
    parts = [torch.empty_like(t) for _ in range(world())]
    _run("all_gather", [t], lambda: dist.all_gather(parts, t.contiguous()))
    return torch.cat(parts)


def barrier() -> None:
    if active():
        _run("barrier", [], lambda: dist.barrier())


def new_group():
    """A second group over the same ranks (its own ordering of collectives). All ranks call it."""
    return dist.new_group() if active() else None


# ------------------------------------------------------------------ out-of-memory votes
# A rank that runs out of memory mid-batch stops issuing collectives; the others would wait
# in theirs until the timeout. Inside `oom_votes()`, every collective is preceded by a vote
# (a 1-element all-reduce on a gloo group of its own): a rank that caught the error casts
# `vote_oom(True)`, which pairs with the others' next vote, so all ranks leave the batch at
# the same collective and have issued the same ones. Outside it, nothing is voted.


@contextlib.contextmanager
def oom_votes(enabled: bool) -> Iterator[None]:
    if not (enabled and active()):
        yield
        return
    if _state["vote"] is None:
        raise CollectiveMisuse("oom_votes: call collectives.init_votes() on every rank first")
    _state["voting"] = True
    try:
        yield
    finally:
        _state["voting"] = False


def init_votes() -> None:
    """Create the vote group (all ranks call it, in the same order as every new_group)."""
    if active() and _state["vote"] is None:
        _state["vote"] = dist.new_group(backend="gloo")


def vote_oom(failed: bool) -> None:
    """Cast this rank's vote; raises PeerOutOfMemory when another rank failed (and this one did not)."""
    if not active() or _state["vote"] is None:
        return
    flag = torch.tensor([1 if failed else 0], dtype=torch.int32)
    try:
        dist.all_reduce(flag, group=_state["vote"])
    except (RuntimeError, dist.DistError) as exc:
        raise _failed("all_reduce(out-of-memory vote)", exc) from exc
    if int(flag) and not failed:
        raise PeerOutOfMemory(f"{where()}: another rank ran out of memory in this batch ({int(flag)} rank(s))")
