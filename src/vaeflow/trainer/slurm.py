"""Several nodes under SLURM: `srun` starts one `vaeflow train` (a torchrun) per node.

A train job with `training.distributed.nnodes: N > 1` is one SLURM job over N nodes
(rules/train.smk asks for `nodes: N` and one task per node). Its batch script, which SLURM
runs on the job's first node, calls `vaeflow train`; that replaces itself with

    srun --nodes=N --ntasks=N --ntasks-per-node=1 --kill-on-bad-exit=1 [--cpus-per-task=C] \\
      --export=ALL,VAEFLOW_RDZV_ENDPOINT=<first host>:<port>,VAEFLOW_RDZV_ID=<job id> \\
      python -m vaeflow.cli train --config ... --results ... --stage ...

so each node runs `vaeflow train` once more, now with a rendezvous endpoint: trainer/launch.py
makes it that node's torchrun (`--nnodes N --nproc-per-node P --rdzv-backend c10d
--rdzv-endpoint <first host>:<port> --rdzv-id <job id>`), whose P workers see
WORLD_SIZE = N * P and train.
The first host of the job is `scontrol show hostnames <NodeList> | head -1`; its torchrun
hosts the rendezvous store (torch recognises its own host name). The port depends on the
job id, so two jobs sharing a first node do not collide. `--kill-on-bad-exit` ends every
node's torchrun when one fails, so a dead node cannot leave the others waiting.

The job's geometry is read with `scontrol show job`, not from SLURM_* variables:
snakemake-executor-plugin-slurm removes those from the job command's environment (it keeps
SLURM_JOB_ID), and `srun` (SLURM >= 22.05) does not inherit the job's --cpus-per-task.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

from vaeflow.trainer.launch import ENDPOINT_ENV, ID_ENV  # how a node's `vaeflow train` learns the rendezvous

RDZV_PORT_BASE = 20000  # ports RDZV_PORT_BASE .. +9999: below Linux's ephemeral range
RDZV_PORT_SPAN = 10000


class LaunchError(RuntimeError):
    """A multi-node stage cannot start here (wrong allocation, not under SLURM, no srun)."""


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    nodes: tuple[str, ...]  # host names, in SLURM's order: nodes[0] runs the batch script
    cpus_per_task: int | None


def parse_job(scontrol_oneliner: str) -> dict[str, str]:
    """`scontrol --oneliner show job ID` as a dict (NodeList, NumNodes, CPUs/Task, ...)."""
    return dict(kv.split("=", 1) for kv in scontrol_oneliner.split() if "=" in kv)


def _scontrol(*args: str) -> str:
    try:
        res = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise LaunchError("SLURM_JOB_ID is set but `scontrol` is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"`scontrol {' '.join(args)}` did not answer within 60 s") from None
    if res.returncode != 0:
        raise LaunchError(f"`scontrol {' '.join(args)}` failed: {res.stderr.strip()}")
    return res.stdout


def current_job(job_id: str) -> SlurmJob:
    """The running job's nodes and CPUs per task, as slurmctld knows them."""
    info = parse_job(_scontrol("--oneliner", "show", "job", job_id))
    nodelist = info.get("NodeList", "")
    if not nodelist or nodelist == "(null)":
        raise LaunchError(f"SLURM job {job_id} has no nodes yet (scontrol: {info.get('JobState')})")
    nodes = tuple(_scontrol("show", "hostnames", nodelist).split())
    cpus = info.get("CPUs/Task", "")
    return SlurmJob(job_id, nodes, int(cpus) if cpus.isdigit() else None)


def rdzv_port(job_id: str) -> int:
    return RDZV_PORT_BASE + int(job_id) % RDZV_PORT_SPAN


def srun_command(job: SlurmJob, worker: list[str], python: str = sys.executable) -> list[str]:
    """Start `python <worker>` (a `vaeflow train`) once per node of `job`, told the rendezvous."""
    n = len(job.nodes)
    srun = ["srun", f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if job.cpus_per_task:
        srun.append(f"--cpus-per-task={job.cpus_per_task}")
    endpoint = f"{job.nodes[0]}:{rdzv_port(job.job_id)}"
    srun.append(f"--export=ALL,{ENDPOINT_ENV}={endpoint},{ID_ENV}={job.job_id}")
    return [*srun, python, *worker]


def manual_commands(nnodes: int, worker: list[str]) -> str:
    """What to run on each machine without SLURM (the README shows the same)."""
    vaeflow = shlex.join(["vaeflow", *worker[2:]])  # worker: -m vaeflow.cli train ...
    return (
        f"on each of the {nnodes} machines (HOST0: the first one's address, RUN_NAME: any word they share):\n"
        f"  {vaeflow} --rdzv-endpoint=HOST0:29500 --rdzv-id=RUN_NAME"
    )


def multinode_command(nnodes: int, nproc_per_node: int, worker: list[str], env=os.environ) -> list[str]:
    """The srun command for this SLURM job, after checking it has `nnodes` nodes; LaunchError otherwise.

    `worker` is the `-m vaeflow.cli train ...` command line that every node runs."""
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        raise LaunchError(
            f"training.distributed.nnodes is {nnodes}: run this stage through SLURM "
            f"(snakemake --profile profiles/slurm), or start it {manual_commands(nnodes, worker)}"
        )
    if env.get("SLURM_STEP_ID") is not None:
        raise LaunchError(
            f"training.distributed.nnodes is {nnodes}, but `vaeflow train` runs inside job step "
            f"{job_id}.{env['SLURM_STEP_ID']} (under srun); call it from the batch script, which starts "
            "one `vaeflow train` per node with srun itself (the train rule's `mpi` resource does so under Snakemake)"
        )
    job = current_job(job_id)
    if len(job.nodes) != nnodes:
        raise LaunchError(
            f"training.distributed.nnodes is {nnodes}, but SLURM job {job_id} has {len(job.nodes)} "
            f"node(s) ({','.join(job.nodes)}); submit it with --nodes={nnodes} --ntasks-per-node=1"
        )
    return srun_command(job, worker)


def train_job_resources(nnodes: int) -> dict:
    """Snakemake resources of the train rule for snakemake-executor-plugin-slurm (2.8.0).

    One node: none (the plugin runs the job under `srun -n1`, as for every rule).
    Several: `nodes` (sbatch --nodes) and `tasks` (--ntasks, one per node); the `mpi`
    resource makes the plugin run the job's command in the batch script instead of under
    `srun -n1` (a single-task step on the first node, in which our srun could not start);
    `tasks_per_gpu: 0` stops a GPU request from turning `tasks` into --ntasks-per-gpu
    (plugin issues 316 and 459). docs/slurm.md explains the choice.
    """
    if nnodes <= 1:
        return {}
    return {"nodes": nnodes, "tasks": nnodes, "mpi": "srun", "tasks_per_gpu": 0}


# -- the evaluate rule's resources ------------------------------------------------------------
# Seconds per test image, by what dominates (docs/benchmarks.md, "Evaluation"):
# CPU, rFID on: two InceptionV3 passes per image (the image and its reconstruction), about
# 2 s each on one thread of the 2-core CI machine (docs/evaluation.md). CPU, everything else
# (MSE/PSNR/SSIM/LPIPS/ELBO/IW-NLL/PCA): 725 s for CelebA's 19,962 test images at 64 px,
# about 0.04 s an image (benchmarks/bench_eval_memory.py), taken as 0.05 and scaled with the
# pixel count. GPU: not measured yet (no GPU run recorded); 0.02 s per rFID image and a tenth of
# the CPU time for the rest, which leaves a GPU job a wide margin at any plausible speed.
EVAL_S_PER_IMAGE = {"cpu": {"rfid": 4.0, "rest": 0.05}, "gpu": {"rfid": 0.02, "rest": 0.005}}
EVAL_REFERENCE_PIXELS = 64 * 64
EVAL_TEST_IMAGES_UNKNOWN = 20000  # before prepare has run: about CelebA's official test split (19,962)
EVAL_MIN_RUNTIME = 15  # minutes: start-up, model build, PCA fit
EVAL_MARGIN = 2.0  # times the estimate


def evaluation_on_gpu(config: dict) -> bool:
    """evaluation.device (or training.device when null) names CUDA: the job needs a GPU."""
    device = config["evaluation"].get("device") or config["training"]["device"]
    return device.startswith("cuda")


def count_test_images(config: dict, manifest: str | os.PathLike | None = None) -> int:
    """Images in the test split: the prepared manifest's count when it exists, else an estimate."""
    import json

    if manifest is not None and os.path.exists(manifest):
        with open(manifest) as f:
            return int(json.load(f)["counts"]["test"])
    data = config["data"]
    if data.get("limit"):
        return max(1, round(data["limit"] * data["split"]["test"]))
    return EVAL_TEST_IMAGES_UNKNOWN


def evaluate_job_resources(config: dict, manifest: str | os.PathLike | None = None, attempt: int = 1) -> dict:
    """Snakemake resources of one evaluate job (rules/evaluate.smk): `runtime` in minutes from
    the test split's size (EVAL_S_PER_IMAGE, times EVAL_MARGIN, times the attempt, so a retry
    gets more time), and `gres: gpu:1` when evaluation runs on CUDA (evaluation_on_gpu)."""
    import math

    ecfg = config["evaluation"]
    gpu = evaluation_on_gpu(config)
    rate = EVAL_S_PER_IMAGE["gpu" if gpu else "cpu"]
    n = count_test_images(config, manifest)
    size = config["data"].get("image_size") or 64
    depth = (config["data"].get("ct") or {}).get("volume_depth", 16) if config["data"].get("spatial_dims") == 3 else 1
    pixels = size * size * depth
    fid = n if ecfg.get("fid_images") is None else min(n, ecfg["fid_images"])
    seconds = n * rate["rest"] * max(1.0, pixels / EVAL_REFERENCE_PIXELS) + fid * rate["rfid"]
    minutes = math.ceil((EVAL_MIN_RUNTIME + EVAL_MARGIN * seconds / 60) * max(1, attempt))
    res = {"runtime": minutes}
    if gpu:
        res["gres"] = "gpu:1"
    return res
