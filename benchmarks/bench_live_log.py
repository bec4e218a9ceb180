"""What watching training live costs: TensorBoard (vaeflow's `logging.tensorboard`) vs DVCLive.

    python benchmarks/bench_live_log.py [--calls 200] [--scalars 8]

Each logger in a process of its own, after `import torch` (a stage has imported it): the import
of the logger, its start, one log call (--scalars values at one step, then what makes them
visible: TensorBoard's flush, DVCLive's next_step) and one 3x52x42 image (the size of a tiny
run's per-epoch grid). DVCLive is measured only where it is installed (it is not a vaeflow
dependency: `pip install dvclive` in a scratch venv) and needs a git repo with a commit, so it
runs in a temporary one. Prints one line per logger, JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap

TENSORBOARD = """
import time, torch
t0 = time.perf_counter()
from torch.utils.tensorboard import SummaryWriter
t1 = time.perf_counter()
w = SummaryWriter(DIR)
t2 = time.perf_counter()
for s in range(CALLS):
    for k in range(SCALARS):
        w.add_scalar(f"train/m{k}", 0.1 * s, s)
    w.flush()
t3 = time.perf_counter()
img = torch.rand(3, 52, 42)
for s in range(20):
    w.add_image("samples/x", img, s)
    w.flush()
t4 = time.perf_counter()
w.close()
"""

DVCLIVE = """
import time, numpy as np, torch
t0 = time.perf_counter()
from dvclive import Live
t1 = time.perf_counter()
live = Live(DIR + "/dvclive", save_dvc_exp=False, report=None)
t2 = time.perf_counter()
for s in range(CALLS):
    for k in range(SCALARS):
        live.log_metric(f"train/m{k}", 0.1 * s)
    live.next_step()
t3 = time.perf_counter()
img = (np.random.rand(52, 42, 3) * 255).astype("uint8")
for s in range(20):
    live.log_image(f"samples/x_{s}.png", img)
t4 = time.perf_counter()
live.end()
"""

REPORT = """
import json
print(json.dumps({"import_s": round(t1 - t0, 3), "start_s": round(t2 - t1, 3),
                  "log_call_ms": round((t3 - t2) / CALLS * 1e3, 3), "image_ms": round((t4 - t3) / 20 * 1e3, 2)}))
"""


def measure(name: str, body: str, calls: int, scalars: int) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        if name == "dvclive":
            if subprocess.run([sys.executable, "-c", "import dvclive"], capture_output=True).returncode:
                return None
            subprocess.run("git init -q && git -c user.email=b@b -c user.name=b commit -q --allow-empty -m init "
                           "&& dvc init -q", shell=True, cwd=tmp, check=True)
        code = f"DIR, CALLS, SCALARS = {tmp!r}, {calls}, {scalars}\n" + textwrap.dedent(body) + REPORT
        res = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--scalars", type=int, default=8, help="values per log call (a GAN stage logs about 8 with lr and speed)")
    args = p.parse_args()
    for name, body in (("tensorboard", TENSORBOARD), ("dvclive", DVCLIVE)):
        out = measure(name, body, args.calls, args.scalars)
        print(json.dumps({"logger": name, **(out or {"skipped": "not installed"})}))


if __name__ == "__main__":
    main()
