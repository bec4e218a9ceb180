"""Data-parallel step time at 1 and 2 processes, and the share of a step spent communicating.

Runs the trainer's own step (forward, backward, gradient all-reduce, optimizer, EMA) of one
stage of the config on random images, the same global batch in every run, under torchrun:

    1 process   with all the threads (--threads, default 2), and with one process's share
    2 processes overlapped: each bucket's all-reduce starts during backward (the default)
    2 processes synchronous: all buckets reduced after backward (overlap off)

"communication" is the time the step waits for the gradient all-reduce after backward
(rank 0); it is the exposed part, so overlapped runs show less of it than synchronous ones.

    python benchmarks/bench_data_parallel.py [--config config/config.yaml] [--stage vae_warmup] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    import torch
    from torch.utils.data import TensorDataset

    from vaeflow import config as cfg
    from vaeflow.metrics import to_model_range
    from vaeflow.trainer.distributed import init_from_env
    from vaeflow.trainer.stage import StageTrainer

    raw = cfg.load_yaml(args.config)
    steps = raw["training"]["pipeline"]["steps"]
    raw["training"]["pipeline"]["steps"] = [s for s in steps if s["name"] == args.stage] or steps[:1]
    raw["training"]["distributed"] = {"nproc_per_node": int(os.environ["WORLD_SIZE"]), "backend": "gloo"}
    config = cfg.validate(raw)
    init_from_env(config["training"]["distributed"])
    d = config["data"]
    images = torch.rand(256, d.get("channels") or 1, d["image_size"], d["image_size"], generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = StageTrainer(config, config["training"]["pipeline"]["steps"][0]["name"], tmp,
                               TensorDataset(images), TensorDataset(images[:32]))
        step = trainer.train_step
        if args.mode == "sync":  # the same buckets, reduced only after backward
            for part, reducer in step.reducers.items():
                reducer.remove()
                step.reducers[part] = trainer.dist.reducer(reducer.params, overlap=False)
        bs = trainer.batch_size
        times, waits = [], []
        for i in range(args.steps + 5):
            idx = trainer.dist.shard(torch.arange(i * bs, (i + 1) * bs) % len(images))
            x = to_model_range(images[idx], trainer.models.model).to(trainer.devices.main)
            before = sum(r.wait_seconds for r in step.reducers.values())
            t0 = time.perf_counter()
            step(x, trainer.state)
            step.optimizer_step(trainer.state)
            t1 = time.perf_counter()
            if i >= 5:  # warm-up steps excluded
                times.append(t1 - t0)
                waits.append(sum(r.wait_seconds for r in step.reducers.values()) - before)
        n_params = sum(len(r.params) for r in step.reducers.values())
        n_buckets = sum(len(r.buckets) for r in step.reducers.values())
    if trainer.dist.main:
        Path(args.out).write_text(json.dumps({"step_s": statistics.median(times), "wait_s": statistics.median(waits),
                                              "params": n_params, "buckets": n_buckets, "batch": bs,
                                              "world": trainer.dist.world}))


def launch(args, nproc: int, mode: str, threads: int) -> dict:
    out = Path(tempfile.mkdtemp()) / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
           "--worker", "--mode", mode, "--out", str(out), "--config", args.config, "--stage", args.stage,
           "--steps", str(args.steps)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--stage", default="vae_warmup")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="threads in all (split over the processes)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="overlap", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    share = max(1, args.threads // 2)
    ones = {t: launch(args, 1, "overlap", t) for t in sorted({args.threads, share}, reverse=True)}
    one = ones[args.threads]
    two = {mode: launch(args, 2, mode, share) for mode in ("overlap", "sync")}
    print(f"config {args.config}, stage {args.stage}, global batch {one['batch']}, {args.threads} threads in all, "
          f"median of {args.steps} steps; {one['params']} parameter tensors in {two['overlap']['buckets']} buckets")
    for t, r in ones.items():
        print(f"1 process, {t} thread(s):    {1e3 * r['step_s']:7.1f} ms/step")
    for mode, r in two.items():
        print(f"2 processes, {mode:<12} {1e3 * r['step_s']:7.1f} ms/step ({one['step_s'] / r['step_s']:.2f}x), "
              f"communication {1e3 * r['wait_s']:6.2f} ms = {100 * r['wait_s'] / r['step_s']:.1f} % of the step")


if __name__ == "__main__":
    main()
