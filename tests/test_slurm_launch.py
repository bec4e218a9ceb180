"""Multi-node launch under SLURM (vaeflow.trainer.slurm), without a cluster: the generated
srun command line, the torchrun options each node derives from it (trainer/launch.py, read
by torchrun's own parser), and the errors of `vaeflow train` when nnodes > 1 cannot start here.
The same command runs on the two-node test cluster in tests/test_slurm.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torch.distributed.run import get_args_parser

from vaeflow.cli import build_parser
from vaeflow.trainer.launch import ENDPOINT_ENV, ID_ENV, torchrun_args
from vaeflow.trainer.slurm import (
    LaunchError,
    SlurmJob,
    multinode_command,
    parse_job,
    rdzv_port,
    srun_command,
    train_job_resources,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = ["-m", "vaeflow.cli", "train", "--config", "c.yaml", "--results", "results", "--stage", "vae"]

# `scontrol --oneliner show job` of a running two-node job (SLURM 22.05, abridged).
SCONTROL_JOB = (
    "JobId=42 JobName=0b6f UserId=root(0) JobState=RUNNING Partition=debug NodeList=vf-n[1-2] "
    "BatchHost=vf-n1 NumNodes=2 NumCPUs=4 NumTasks=2 CPUs/Task=2 ReqB:S:C:T=0:0:*:* "
    "TresPerNode=gres:gpu:1 Comment=rule_train_wildcards_vae"
)


def test_parse_scontrol_job():
    info = parse_job(SCONTROL_JOB)
    assert info["NodeList"] == "vf-n[1-2]" and info["CPUs/Task"] == "2" and info["NumNodes"] == "2"


def test_srun_command_one_vaeflow_train_per_node():
    job = SlurmJob("42", ("vf-n1", "vf-n2"), 2)
    cmd = srun_command(job, WORKER, python="/venv/bin/python")
    port = rdzv_port("42")
    assert cmd == [
        "srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=2",
        f"--export=ALL,VAEFLOW_RDZV_ENDPOINT=vf-n1:{port},VAEFLOW_RDZV_ID=42", "/venv/bin/python", *WORKER,
    ]  # fmt: skip


def test_each_node_becomes_a_c10d_torchrun():
    """What each node's `vaeflow train` runs with the variables srun exports (trainer/launch.py):
    torchrun's own parser reads c10d at the first host, the job id as run id."""
    cmd = srun_command(SlurmJob("42", ("vf-n1", "vf-n2"), 2), WORKER)
    (export,) = [o for o in cmd if o.startswith("--export=")]
    env = dict(kv.split("=", 1) for kv in export.removeprefix("--export=").split(",")[1:])
    opts = torchrun_args(4, 2, env[ENDPOINT_ENV], env[ID_ENV], timeout_s=600)
    args = get_args_parser().parse_args([*opts, *WORKER])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "4", "c10d")
    assert args.rdzv_endpoint == f"vf-n1:{rdzv_port('42')}" and args.rdzv_id == "42"
    assert args.module and args.training_script == "vaeflow.cli" and args.training_script_args == WORKER[2:]


def test_srun_command_without_cpus_per_task():
    cmd = srun_command(SlurmJob("7", ("a", "b", "c"), None), WORKER)
    assert not any(o.startswith("--cpus-per-task") for o in cmd)
    assert "--nodes=3" in cmd and "--export=ALL,VAEFLOW_RDZV_ENDPOINT=a:20007,VAEFLOW_RDZV_ID=7" in cmd


def test_rdzv_port_per_job_below_ephemeral_range():
    ports = {rdzv_port(str(j)) for j in range(1, 5000)}
    assert len(ports) == 4999 and min(ports) >= 20000 and max(ports) < 32768
    assert rdzv_port("12345") == rdzv_port("12345")


def test_train_job_resources():
    assert train_job_resources(1) == {}
    res = train_job_resources(3)
    # nodes and one task per node; `mpi` makes the plugin run the job in the batch script
    # (not under `srun -n1`); tasks_per_gpu 0 keeps a GPU request from becoming --ntasks-per-gpu
    assert res == {"nodes": 3, "tasks": 3, "mpi": "srun", "tasks_per_gpu": 0}


def test_outside_slurm_names_the_command_for_each_machine():
    with pytest.raises(LaunchError, match="nnodes is 2") as err:
        multinode_command(2, 1, WORKER, env={})
    (line,) = [x.strip() for x in str(err.value).splitlines() if x.strip().startswith("vaeflow train")]
    args = build_parser().parse_args(line.split()[1:])  # the vaeflow command accepts it
    assert (args.stage, args.rdzv_endpoint, args.rdzv_id) == ("vae", "HOST0:29500", "RUN_NAME")


def test_inside_a_job_step_refuses():
    """Under `srun -n1` (a single-task step) a nested srun would wait for CPUs forever."""
    with pytest.raises(LaunchError, match=r"job step 5\.0"):
        multinode_command(2, 1, WORKER, env={"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0"})


def test_vaeflow_train_nnodes_outside_slurm_is_one_clear_error(tmp_path):
    cfg = yaml.safe_load((REPO / "tests/configs/tiny.yaml").read_text())
    cfg["training"]["distributed"] = {"nnodes": 2}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {"PATH": "/usr/bin:/bin", "SLURM_CONF": "/dev/null"}
    res = subprocess.run(
        [sys.executable, "-m", "vaeflow.cli", "train", "--config", "c.yaml", "--results", "results", "--stage", "vae_warmup"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("vaeflow: error: training.distributed.nnodes is 2") and "Traceback" not in res.stderr
    assert "--rdzv-endpoint=HOST0:29500" in res.stderr
    assert not (tmp_path / "results").exists()


def test_nnodes_must_be_a_positive_integer(tmp_path):
    from vaeflow.config import ConfigError, load

    cfg = yaml.safe_load((REPO / "tests/configs/tiny.yaml").read_text())
    assert load(REPO / "tests/configs/tiny.yaml")["training"]["distributed"]["nnodes"] == 1
    cfg["training"]["distributed"] = {"nnodes": 0}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="nnodes"):
        load(tmp_path / "c.yaml")


def test_tests_use_the_cluster_that_slurm_up_starts():
    """tests/test_slurm.py looks for the configuration where .ci/slurm-up.sh writes it."""
    script = (REPO / ".ci/slurm-up.sh").read_text()
    (base,) = re.findall(r'^BASE="\$\{VAEFLOW_SLURM_DIR:-([^}]+)\}"', script, re.M)
    assert re.search(r'^ETC="\$BASE/etc"$', script, re.M) and re.search(r'^CONF="\$ETC/slurm.conf"$', script, re.M)
    test = (REPO / "tests/test_slurm.py").read_text()
    assert f'"{base}/etc/slurm.conf"' in test


def test_rules_import_no_torch():
    """rules/train.smk imports train_job_resources: the Snakefile must not pay torch's import."""
    code = "import sys, vaeflow.trainer.slurm; assert 'torch' not in sys.modules, 'torch imported'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
