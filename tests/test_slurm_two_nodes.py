"""The real workflow through SLURM on two nodes: `snakemake --profile profiles/slurm` with the
tiny test config, every training stage one SLURM job over both nodes of the private test
cluster (training.distributed.nnodes: 2): one torchrun per node through srun, c10d rendezvous
at the job's first node.

The cluster, the plugin checks and the machinery (a temporary copy of the tree, Snakemake in
the background, the sbatch/scontrol/squeue assertions) are tests/test_slurm.py's, which pushes
a toy workflow through the same profile. A file of its own so that pytest-xdist runs it beside
that one (`--dist loadfile`): both mostly wait on SLURM jobs and the plugin's polling.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import yaml

from test_slurm import (  # noqa: F401  (fixtures: pytest finds them by name in this module)
    REPO,
    SlurmCase,
    _scontrol_job,
    _slurm,
    _submissions,
    _wait_for,
    assert_went_through_slurm,
    assert_targets,
    make_rundir,
    slurm_cluster,
    start_snakemake,
)

pytestmark = pytest.mark.slow

TWO_NODES = "two_nodes.yaml"  # written into the run directory by the test


@pytest.fixture
def vaeflow_case() -> SlurmCase:
    """The real workflow with the tiny test config, every training stage on two nodes."""
    return SlurmCase(
        name="vaeflow",
        root=REPO,
        targets=["results/vae_gan/best.pt"],
        configfile=f"tests/configs/tiny.yaml {TWO_NODES}",
        # at least these went through sbatch (prepare does too, unless it becomes a localrule)
        slurm_rules={"train"},
        local_rules=set(),  # rules that must not go through sbatch, e.g. {"download"}
        timeout_s=1800,
    )


def _sacct_completion(slurm_id: str) -> dict[str, str]:
    """The job as jobcomp/filetxt recorded it when it ended (`sacct -c`: no slurmdbd needed)."""
    fields = "JobID,NNodes,NodeList,State"
    out = _slurm("sacct", "-c", "-n", "-P", "-j", slurm_id, "-o", fields)
    assert out.returncode == 0, out.stderr
    rows = [dict(zip(fields.split(","), line.split("|"))) for line in out.stdout.splitlines()]
    (row,) = [r for r in rows if r["JobID"] == slurm_id]
    return row


def _slurmd_log(node: str) -> Path:
    conf = _slurm("scontrol", "show", "config").stdout
    (path,) = re.findall(r"^SlurmdLogFile\s*=\s*(\S+)", conf, re.M)
    return Path(path.replace("%n", node).replace("%h", node))


def test_vaeflow_pipeline_two_nodes_through_slurm(slurm_cluster, vaeflow_case, make_rundir, start_snakemake):
    """Both training stages, each one SLURM job over two nodes: srun starts a torchrun per node."""
    rundir = make_rundir(vaeflow_case)
    (rundir / TWO_NODES).write_text("training:\n  distributed: {nnodes: 2, nproc_per_node: 1}\n")
    run = start_snakemake(rundir, vaeflow_case)
    rc = run.wait()
    assert rc == 0, f"snakemake exited {rc}\n{run.tail()}"
    assert_targets(run)
    subs = assert_went_through_slurm(run)
    assert all(s["state"] == "COMPLETED" for s in subs), subs

    train = [s for s in subs if s["rule"] == "train"]
    stages = []
    for s in train:
        job = s["slurm"]
        info = _scontrol_job(job)
        stage = info["Comment"].removeprefix("rule_train_wildcards_")
        stages.append(stage)
        # the rule's resources reached sbatch: 2 nodes, one task each, GPUs per node, no --ntasks-per-gpu
        assert info["NumNodes"] == "2" and info["NumTasks"] == "2", info
        assert "gpu" in info.get("TresPerNode", "") and "NtasksPerTRES" not in info, info
        nodes = _slurm("scontrol", "show", "hostnames", info["NodeList"]).stdout.split()
        assert len(nodes) == 2, nodes
        # the job's record after it ended (what `sacct -c` reads)
        done = _sacct_completion(job)
        assert done["NNodes"] == "2" and done["State"] == "COMPLETED", done
        # vaeflow train started one vaeflow train (torchrun) per node: rendezvous at the first node, id = job id
        log = (rundir / f"results/logs/train_{stage}.log").read_text()
        assert "vaeflow: srun --nodes=2 --ntasks=2 --ntasks-per-node=1" in log, log[:3000]
        assert f"VAEFLOW_RDZV_ENDPOINT={nodes[0]}:" in log and f"VAEFLOW_RDZV_ID={job} " in log, log[:3000]
        assert "Data parallel over 2 processes" in log, log[-3000:]
        # the step ran on the second node too (its slurmd launched the step's task)
        assert f"launch task StepId={job}.0 " in _slurmd_log(nodes[1]).read_text(), nodes[1]
    assert sorted(stages) == ["vae_gan", "vae_warmup"], stages


def _worker_pid(slurm_id: str, node: str, rank: int) -> int | None:
    """The torchrun worker of `rank` that SLURM job `slurm_id` runs on `node` (all nodes share /proc here)."""
    want = {f"SLURM_JOB_ID={slurm_id}", f"SLURMD_NODENAME={node}", f"RANK={rank}"}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = set((proc / "environ").read_bytes().decode(errors="replace").split("\0"))
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if want <= env and "vaeflow.cli" in cmd and "torch.distributed.run" not in cmd:
            return int(proc.name)
    return None


@pytest.mark.skipif(
    os.environ.get("VAEFLOW_SLURM_FAULT_TEST") != "1",
    reason="kills a worker of a two-node SLURM stage, ~3 min; set VAEFLOW_SLURM_FAULT_TEST=1 to run it",
)
def test_two_node_stage_survives_a_killed_worker(slurm_cluster, vaeflow_case, make_rundir, start_snakemake):
    """SIGKILL of the rank-1 worker on the second node fails the whole job (srun --kill-on-bad-exit);
    Snakemake's retry resumes the stage on both nodes from running/last.pt."""
    vaeflow_case.targets = ["results/vae_warmup/best.pt"]
    rundir = make_rundir(vaeflow_case)
    tiny = yaml.safe_load((rundir / "tests/configs/tiny.yaml").read_text())
    steps = tiny["training"]["pipeline"]["steps"]
    steps[0]["n_epochs"] = 6  # long enough to be killed in the middle
    (rundir / TWO_NODES).write_text(
        yaml.safe_dump({"training": {"distributed": {"nnodes": 2}, "pipeline": {"steps": steps}}})
    )
    run = start_snakemake(rundir, vaeflow_case)
    last = rundir / "results/vae_warmup/running/last.pt"

    def victim():
        subs = [s for s in _submissions(run.text()) if s["rule"] == "train"]
        if not subs or not last.exists():
            return None
        info = _scontrol_job(subs[-1]["slurm"])
        nodes = _slurm("scontrol", "show", "hostnames", info["NodeList"]).stdout.split()
        pid = _worker_pid(subs[-1]["slurm"], nodes[-1], rank=1)
        return (subs[-1]["slurm"], nodes[-1], pid) if pid else None

    job, node, pid = _wait_for(victim, 600, "the two-node stage to save last.pt", run)
    os.kill(pid, signal.SIGKILL)

    rc = run.wait()
    assert rc == 0, f"snakemake exited {rc} after killing rank 1 (pid {pid}) of job {job} on {node}\n{run.tail()}"
    assert_targets(run)
    train = [s for s in assert_went_through_slurm(run) if s["rule"] == "train"]
    assert [s["state"] for s in train] == ["FAILED", "COMPLETED"], train
    assert train[0]["slurm"] == job
    assert _scontrol_job(train[1]["slurm"])["NumNodes"] == "2"
    # the failed attempt's log (Snakemake shows it) names the killed rank and its node
    failed = run.text()
    assert re.search(  # torchrun's failure table, or vaeflow's one line (trainer/launch.py)
        rf"host\s*:\s*{node}\s*\n\s*rank\s*:\s*1 \(local_rank: 0\)|rank 1 \(local rank 0, pid {pid}\)", failed
    ), run.tail(200)
    assert "SIGKILL" in failed
    log = (rundir / "results/logs/train_vae_warmup.log").read_text()
    assert "Resuming from checkpoint" in log and "Data parallel over 2 processes" in log, log[-3000:]
