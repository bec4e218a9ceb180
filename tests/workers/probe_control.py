"""Controls for the probe: mistakes it must catch (tests/test_distributed.py).

probe_control.py OUT_DIR, under torchrun with 2 ranks; writes OUT_DIR/control<R>.json, the
outcome of each case ("ok" or "<error type>: <message>").
Every check raises before any data moves, so the group stays usable for the next case.

host_tensor       the old Dist.mean_dict: a float64 tensor built from Python floats (host
                  memory in a CUDA run) handed to torch.distributed.all_reduce
host_tensor_ours  the same through vaeflow.collectives (its own device check)
rank_local        rank 0 all-reduces inside code only it runs (the shape of the VQ hang)
mean_dict         the fixed Dist.mean_dict: must pass
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dist_probe import ACCEL, install  # noqa: E402

install(sys.argv[1])
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from vaeflow import collectives  # noqa: E402
from vaeflow.trainer.distributed import Dist, init_from_env  # noqa: E402


def rank_local(d: Dist) -> None:
    if d.main:
        with d.rank_local("rank 0's sample grids"):
            collectives.all_reduce(torch.ones(3, device=ACCEL))


CASES = {
    "host_tensor": lambda d: dist.all_reduce(torch.tensor([0.5, 1.5], dtype=torch.float64)),
    "host_tensor_ours": lambda d: collectives.all_reduce(torch.tensor([0.5, 1.5], dtype=torch.float64)),
    "rank_local": rank_local,
    "mean_dict": lambda d: d.mean_dict({"a": 1.0 + d.rank}),
}

init_from_env({"backend": "gloo", "timeout_s": 30})
d = Dist(ACCEL)
outcomes = {}
for name, case in CASES.items():
    try:
        outcomes[name] = ["ok", case(d)]
    except Exception as exc:  # noqa: BLE001
        outcomes[name] = [f"{type(exc).__name__}: {exc}", None]
    d.barrier()
(Path(sys.argv[1]) / f"control{d.rank}.json").write_text(json.dumps(outcomes))
dist.destroy_process_group()
