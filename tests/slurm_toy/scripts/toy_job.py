"""Toy job for all rules: records where it ran; `train` checkpoints into running/, resumes, publishes."""

import json
import os
import socket
import time
from pathlib import Path

snakemake = globals()["snakemake"]  # injected by Snakemake's script directive


def where():
    return {
        "rule": snakemake.rule,
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm_cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK"),
        "slurm_mem_per_node": os.environ.get("SLURM_MEM_PER_NODE"),
    }


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)  # atomic, like the trainer's checkpoint save


if snakemake.rule != "train":
    write_json(snakemake.output[0], where())
else:
    running = Path(snakemake.params.running)
    last = running / "last.pt"
    state = json.loads(last.read_text()) if last.exists() else {"step": 0, "runs": []}
    resumed_from = state["step"]
    state["runs"].append(where() | {"resumed_from": resumed_from})
    write_json(last, state)
    for step in range(resumed_from, snakemake.params.steps):
        time.sleep(snakemake.params.step_seconds)
        state["step"] = step + 1
        write_json(last, state)
    # publish only when the stage is complete, then drop the work dir
    write_json(running / "best.pt", state | {"stage": snakemake.wildcards.stage})
    os.replace(running / "best.pt", snakemake.output.best)
    os.replace(last, snakemake.output.last)
    running.rmdir()
