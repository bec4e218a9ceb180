"""How `vaeflow train` starts several processes: torchrun, on one node or on several.

Interface (the SLURM rule, the README's per-machine command and the tests rely on it):

    vaeflow train --config C --stage S [--rdzv-endpoint HOST:PORT] [--rdzv-id ID]

    environment instead of the flags (the flags win): VAEFLOW_RDZV_ENDPOINT, VAEFLOW_RDZV_ID

With `training.distributed.nproc_per_node` x `nnodes` > 1 and not yet inside torchrun,
`vaeflow train` runs torchrun (`torch.distributed.run`, in this process) with
`torchrun_args(...)` and the same `vaeflow train` command as each worker:

    nnodes == 1:  torchrun --standalone --nproc-per-node P
    nnodes == N:  torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d
                           --rdzv-endpoint HOST:PORT --rdzv-id ID --rdzv-conf join_timeout=T

With several nodes, run the same command once on every node, with the same endpoint (a
host:port of the first node that every node can reach; its launcher hosts the rendezvous
store) and the same id (any string unique to this run, e.g. the SLURM job id). Ranks are
assigned by the rendezvous; rank 0 writes results, so the results directory (and
results/data) must be on a filesystem every node shares. T is training.distributed.timeout_s.

When a worker fails (an error, SIGKILL, a collective timeout), torchrun stops the other
local workers and `launch` prints one line naming the failed rank(s) and returns 1.
"""

from __future__ import annotations

import os
import signal
import sys

ENDPOINT_ENV = "VAEFLOW_RDZV_ENDPOINT"
ID_ENV = "VAEFLOW_RDZV_ID"


def torchrun_args(nproc_per_node: int, nnodes: int, rdzv_endpoint: str | None, rdzv_id: str | None,
                  timeout_s: float, source: str | None = None) -> list[str]:
    """torchrun's options (everything before the worker command) for this layout; `source`
    names the config file(s) in errors."""
    if nnodes == 1:
        return ["--standalone", f"--nproc-per-node={nproc_per_node}"]
    if not rdzv_endpoint:
        from vaeflow.config import ConfigError

        raise ConfigError(
            "training.distributed.nnodes",
            f"{nnodes} nodes need a rendezvous endpoint: pass --rdzv-endpoint HOST:PORT "
            f"(or set {ENDPOINT_ENV}), the same on every node",
            source,
        )
    return [
        f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id or 'vaeflow'}",
        f"--rdzv-conf=join_timeout={int(timeout_s)}",
    ]


def _describe(rank: int, failure) -> str:
    where = f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid})"
    if failure.exitcode < 0:
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        return f"{where} was killed by {name}"
    msg = failure.message
    if isinstance(msg, dict):
        msg = msg.get("message", "")
    first = str(msg).strip().splitlines()[0] if msg and "pytorch.org" not in str(msg) else ""
    return f"{where} exited with code {failure.exitcode}" + (f": {first}" if first else "")


def failure_line(failures: dict) -> str:
    """One line for the launcher: the ranks killed by a signal first (the cause; the others
    usually failed because they lost them), then by time of failure."""
    order = sorted(failures, key=lambda r: (failures[r].exitcode >= 0, failures[r].timestamp, r))
    return "; ".join(_describe(r, failures[r]) for r in order)


def launch(worker_argv: list[str], dcfg: dict, rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
           source: str | None = None) -> int:
    """Run `vaeflow <worker_argv>` under torchrun with training.distributed `dcfg` (from the
    config file(s) `source`). Returns the exit code."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    rdzv_endpoint = rdzv_endpoint or os.environ.get(ENDPOINT_ENV)
    rdzv_id = rdzv_id or os.environ.get(ID_ENV)
    opts = torchrun_args(dcfg["nproc_per_node"], dcfg["nnodes"], rdzv_endpoint, rdzv_id, dcfg["timeout_s"], source)
    # Workers whose peers failed are stopped with SIGTERM, then SIGKILL after this many seconds
    # (torchrun's default is 30); checkpoints are atomic, so there is nothing to wait for.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "5")
    sys.stdout.flush()
    try:
        run(parse_args([*opts, "-m", "vaeflow.cli", *worker_argv]))
    except ChildFailedError as exc:
        print(f"vaeflow: error: training failed: {failure_line(exc.failures)}; the other workers were "
              "stopped. Rerun the same command to resume from the last checkpoint.", file=sys.stderr)
        return 1
    except (RendezvousError, DistError) as exc:  # the rendezvous store (on another node) went away
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"vaeflow: error: training failed: this node lost the rendezvous at {rdzv_endpoint} "
              f"({type(exc).__name__}: {first}); another node stopped or failed and this node's workers were "
              "stopped. Rerun the same command on every node to resume from the last checkpoint.", file=sys.stderr)
        return 1
    return 0


def record_worker_error(exc: BaseException) -> None:
    """Inside a torchrun worker: leave the one-line error where the launcher reads it."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    try:
        ErrorHandler().record_exception(exc)
    except OSError:
        pass
