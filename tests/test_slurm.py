"""End to end through SLURM: `snakemake --profile profiles/slurm` on a real cluster.

Needs a SLURM cluster that this machine can submit to; `sudo .ci/slurm-up.sh`
starts a one-node cluster on localhost (Debian's slurmctld/slurmd/munge), and
snakemake-executor-plugin-slurm in the Python environment running pytest.
Without them these tests skip with the reason; with CI=true they fail instead.

Two workflows go through the same machinery:

* a toy workflow (tests/slurm_toy/: same layout as the real one, seconds per job)
  that proves the profile, the plugin and the cluster on their own, including a
  training job killed by SLURM that is retried and resumes from last.pt;
* the real workflow (workflow/Snakefile with the tiny test config). Its
  workflow-specific settings are the `vaeflow_case` fixture below.

Each run happens in a temporary copy of the tree. The test asserts that the jobs
went through sbatch (job ids printed by the plugin, then found by
`scontrol show job` / `squeue --states=all` as COMPLETED, with the plugin's
rule comment, and their logs under .snakemake/slurm_logs), that the local rules
did not, and that the targets exist.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TOY = Path(__file__).resolve().parent / "slurm_toy"

pytestmark = pytest.mark.slow


@dataclass
class SlurmCase:
    """One workflow to push through the SLURM profile."""

    name: str
    root: Path  # tree copied into the temporary run directory
    targets: list[str]  # relative to the run directory
    configfile: str | None  # relative to the run directory
    slurm_rules: set[str]  # rules that must have run as SLURM jobs
    local_rules: set[str] = field(default_factory=set)  # rules that must not
    train_rule: str = "train"
    extra_args: list[str] = field(default_factory=list)
    timeout_s: int = 900  # for the whole snakemake run


# --------------------------------------------------------------------------
# Workflow-specific part: adjust these two fixtures.
# --------------------------------------------------------------------------


@pytest.fixture
def vaeflow_case() -> SlurmCase:
    """The real workflow with the tiny test config."""
    return SlurmCase(
        name="vaeflow",
        root=REPO,
        targets=["results/vae_gan/best.pt"],
        configfile="tests/configs/tiny.yaml",
        # at least these went through sbatch (prepare does too, unless it becomes a localrule)
        slurm_rules={"train"},
        local_rules=set(),  # rules that must not go through sbatch, e.g. {"download"}
        timeout_s=1800,
    )


@pytest.fixture
def toy_case() -> SlurmCase:
    """The toy workflow in tests/slurm_toy (download is a localrule)."""
    return SlurmCase(
        name="toy",
        root=TOY,
        targets=["results/vae_gan/best.pt"],
        configfile="config/test.yaml",
        slurm_rules={"prepare", "train"},
        local_rules={"download"},
        timeout_s=600,
    )


# --------------------------------------------------------------------------
# Infrastructure
# --------------------------------------------------------------------------

# The profile polls job states every 20 s at first (meant for real clusters);
# the toy jobs take seconds, so poll sooner here. Everything else comes from
# profiles/slurm unchanged (plus --max-threads, see SnakemakeRun).
FAST_STATUS = ["--slurm-init-seconds-before-status-checks", "5"]

SUBMITTED_RE = re.compile(
    r"Job (?P<job>\d+) has been submitted with SLURM jobid (?P<slurm>\d+) \(log: (?P<log>[^)]*)\)"
)
RUN_ID_RE = re.compile(r"SLURM run ID: (\S+)")


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(
            f"{reason} -- CI=true, so the SLURM test must run (start the cluster with .ci/slurm-up.sh)"
        )
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster() -> int:
    """Skip (fail under CI=true) unless sbatch works against an up cluster; returns CPUs per node."""
    for tool in ("sbatch", "sinfo", "squeue", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            _unavailable(
                f"`{tool}` is not on PATH (no SLURM client); run `sudo .ci/slurm-up.sh` for a local cluster"
            )
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        _unavailable(
            "snakemake-executor-plugin-slurm is not installed (pip install snakemake-executor-plugin-slurm)"
        )
    try:
        out = subprocess.run(
            ["sinfo", "--noheader", "--format=%T|%c"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        _unavailable("`sinfo` timed out: slurmctld is not answering; run `sudo .ci/slurm-up.sh`")
    if out.returncode != 0:
        _unavailable(
            f"`sinfo` failed, the SLURM cluster is not up ({out.stderr.strip()[:300]}); run `sudo .ci/slurm-up.sh`"
        )
    rows = [line.split("|") for line in out.stdout.split()]
    usable = [
        int(cpus)
        for state, cpus in rows
        if state.rstrip("*~#$@^-") in {"idle", "mixed", "allocated", "completing"}
    ]
    if not usable:
        _unavailable(
            f"no usable SLURM node (sinfo: {out.stdout.split() or 'none'}); run `sudo .ci/slurm-up.sh`"
        )
    return max(usable)


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy the files git would see (tracked + untracked, not ignored); plain copy without git."""
    files = None
    if (src / ".git").exists() and shutil.which("git"):
        res = subprocess.run(
            ["git", "-C", str(src), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
        )
        if res.returncode == 0:
            files = [f for f in res.stdout.decode().split("\0") if f]
    if files is None:
        skip = {
            ".git",
            ".venv",
            "results",
            ".snakemake",
            "data",
            "__pycache__",
            ".pytest_cache",
            "build",
            "dist",
        }
        shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in skip], dirs_exist_ok=True)
        return
    for rel in files:
        s = src / rel
        if s.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, dst / rel)


@pytest.fixture
def make_rundir(tmp_path):
    def make(case: SlurmCase) -> Path:
        run = tmp_path / case.name
        run.mkdir()
        _copy_tree(case.root, run)
        if case.root != REPO:  # the toy gets the repository's profiles, as the real tree has them
            shutil.copytree(REPO / "profiles", run / "profiles", dirs_exist_ok=True)
        return run

    return make


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    # jobs inherit this environment (sbatch --export=ALL): put this Python first
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _submissions(log_text: str) -> list[dict]:
    """(snakemake job, SLURM job id, rule, log path) for every sbatch the plugin reported."""
    subs = []
    for m in SUBMITTED_RE.finditer(log_text):
        rule = re.search(r"/(?:rule|group)_([^/]+)/", m["log"])
        subs.append(
            {"job": m["job"], "slurm": m["slurm"], "rule": rule[1] if rule else None, "log": Path(m["log"])}
        )
    return subs


def _scancel_run(log_text: str) -> None:
    """Cancel whatever this run left in the queue (all its jobs share the run id as job name)."""
    for run_id in set(RUN_ID_RE.findall(log_text)):
        subprocess.run(["scancel", "--name", run_id], capture_output=True)


class SnakemakeRun:
    """snakemake running in the background, output in a log file."""

    def __init__(self, rundir: Path, case: SlurmCase, args: list[str], node_cpus: int):
        self.rundir = rundir
        self.case = case
        self.log_path = rundir / "snakemake-test.log"
        # targets first: --configfile and --config take several values
        self.cmd = [
            sys.executable,
            "-m",
            "snakemake",
            *case.targets,
            "--profile",
            "profiles/slurm",
            *FAST_STATUS,
        ]
        # a rule asking for more threads than a node has is rejected by sbatch
        # (the CI node has 2 CPUs); cap them as Snakemake does for local runs
        self.cmd += ["--max-threads", str(node_cpus)]
        if case.configfile:
            self.cmd += ["--configfile", case.configfile]
        self.cmd += [*case.extra_args, *args]
        self._log = open(self.log_path, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=rundir,
            env=_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=max(1, self.case.timeout_s - (time.monotonic() - self.t0)))
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"snakemake did not finish within {self.case.timeout_s}s\n{self.tail()}")
        finally:
            self._log.close()

    def stop(self) -> None:
        # Snakemake ignores SIGTERM while jobs run; SIGINT makes it cancel its SLURM jobs and exit.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        _scancel_run(self.text())

    def tail(self, n: int = 80) -> str:
        return "--- snakemake output (tail) ---\n" + "\n".join(self.text().splitlines()[-n:])


@pytest.fixture
def start_snakemake(slurm_cluster):
    runs: list[SnakemakeRun] = []

    def start(rundir: Path, case: SlurmCase, *args: str) -> SnakemakeRun:
        run = SnakemakeRun(rundir, case, list(args), node_cpus=slurm_cluster)
        runs.append(run)
        return run

    yield start
    for run in runs:  # never leave snakemake or jobs behind
        run.stop()


def _scontrol_job(slurm_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "--oneliner", "show", "job", slurm_id], capture_output=True, text=True)
    assert out.returncode == 0, f"scontrol show job {slurm_id}: {out.stderr.strip()}"
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def _squeue_states(slurm_ids) -> dict[str, str]:
    out = subprocess.run(
        ["squeue", "--noheader", "--states=all", "--format=%i|%T", f"--jobs={','.join(slurm_ids)}"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return dict(line.split("|", 1) for line in out.stdout.split())


def assert_went_through_slurm(run: SnakemakeRun) -> list[dict]:
    """The rules that should have been sbatch'ed were, they completed, and the local rules were not."""
    text = run.text()
    subs = _submissions(text)
    assert subs, f"no sbatch submission reported by the plugin\n{run.tail()}"
    rules = {s["rule"] for s in subs}
    missing = run.case.slurm_rules - rules
    assert not missing, f"rules {missing} never went through sbatch (submitted: {rules})\n{run.tail()}"
    leaked = run.case.local_rules & rules
    assert not leaked, f"localrules {leaked} were submitted to SLURM"
    for rule in run.case.local_rules:
        assert re.search(
            rf"^localrule {re.escape(rule)}:", text, re.M
        ), f"localrule {rule} did not run locally"

    # The jobs as SLURM knows them (kept for MinJobAge after they end).
    ids = [s["slurm"] for s in subs]
    states = _squeue_states(ids)
    for s in subs:
        info = _scontrol_job(s["slurm"])
        assert info.get("Comment", "").startswith(f"rule_{s['rule']}"), info
        assert info["WorkDir"] == str(run.rundir), info
        s["state"] = info["JobState"]
        assert states.get(s["slurm"]) == s["state"], (states, s)
        # profiles/slurm keeps the logs of successful jobs
        assert s["log"].is_file(), f"no SLURM log {s['log']}"
    return subs


def assert_targets(run: SnakemakeRun) -> None:
    for t in run.case.targets:
        assert (run.rundir / t).is_file(), f"target {t} missing\n{run.tail()}"


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_toy_pipeline_through_slurm(slurm_cluster, toy_case, make_rundir, start_snakemake):
    rundir = make_rundir(toy_case)
    run = start_snakemake(rundir, toy_case)
    rc = run.wait()
    assert rc == 0, f"snakemake exited {rc}\n{run.tail()}"
    assert_targets(run)
    subs = assert_went_through_slurm(run)
    assert all(s["state"] == "COMPLETED" for s in subs), subs

    by_id = {s["slurm"]: s for s in subs}
    # The download ran on this host, outside any SLURM job.
    assert json.loads((rundir / "results/raw/source.json").read_text())["slurm_job_id"] is None
    # prepare ran in the job the plugin reported, with the rule's resources.
    prep = json.loads((rundir / "results/data/manifest.json").read_text())
    assert by_id[prep["slurm_job_id"]]["rule"] == "prepare"
    # train got the profile's set-resources (GPU, CPUs, time limit) from sbatch.
    want = yaml.safe_load((rundir / "profiles/slurm/config.yaml").read_text())["set-resources"]["train"]
    for stage in ("vae", "vae_gan"):
        best = json.loads((rundir / f"results/{stage}/best.pt").read_text())
        (job,) = best["runs"]
        assert by_id[job["slurm_job_id"]]["rule"] == "train"
        info = _scontrol_job(job["slurm_job_id"])
        if want.get("gpu") or "gpu" in str(want.get("gres", "")):
            assert "gpu" in info.get("TresPerJob", ""), info
            assert job["cuda_visible_devices"] is not None, "train job got no GPU from SLURM"
        if isinstance(want.get("cpus_per_task"), int):
            assert job["slurm_cpus_per_task"] == str(want["cpus_per_task"]), job
        if isinstance(want.get("runtime"), int):
            days, minutes = divmod(want["runtime"], 24 * 60)
            limit = f"{minutes // 60:02d}:{minutes % 60:02d}:00"
            assert info["TimeLimit"] == (f"{days}-{limit}" if days else limit), info
    # The workflow profile was loaded next to the SLURM profile.
    assert "workflow specific profile profiles/default" in run.text()


def _wait_for(pred: Callable[[], object], timeout: float, what: str, run: SnakemakeRun):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if run.proc.poll() is not None:
            pytest.fail(f"snakemake exited ({run.proc.returncode}) while waiting for {what}\n{run.tail()}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{run.tail()}")


def _running_train_job(run: SnakemakeRun, stage: str):
    """SLURM id of the running train job for `stage`, once it has written a checkpoint step."""
    last = run.rundir / f"results/{stage}/running/last.pt"
    subs = [s for s in _submissions(run.text()) if s["rule"] == run.case.train_rule]
    if not subs or not last.exists():
        return None
    try:
        state = json.loads(last.read_text())
    except json.JSONDecodeError:
        return None
    return subs[-1]["slurm"] if state["step"] >= 2 else None


@pytest.mark.parametrize(
    "kill",
    [
        # SLURM ends the job (CANCELLED, like a preemption without requeue or a
        # time limit): Snakemake retries it as a new job, which resumes.
        pytest.param(["scancel"], id="killed-retried"),
        # Preemption with requeue: the same SLURM job starts over and resumes.
        pytest.param(["scontrol", "requeue"], id="requeued"),
    ],
)
def test_toy_train_killed_by_slurm_resumes(slurm_cluster, toy_case, make_rundir, start_snakemake, kill):
    toy_case.targets = ["results/vae/best.pt"]
    rundir = make_rundir(toy_case)
    steps = 16
    run = start_snakemake(rundir, toy_case, "--config", f"steps={steps}", "step_seconds=0.5")

    victim = _wait_for(lambda: _running_train_job(run, "vae"), 180, "train to checkpoint", run)
    res = subprocess.run([*kill, victim], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr

    rc = run.wait()
    assert rc == 0, f"snakemake exited {rc} after `{' '.join(kill)} {victim}`\n{run.tail()}"
    assert_targets(run)
    subs = assert_went_through_slurm(run)
    train = [s for s in subs if s["rule"] == "train"]

    best = json.loads((rundir / "results/vae/best.pt").read_text())
    assert best["step"] == steps
    first, *later = best["runs"]
    assert first["resumed_from"] == 0 and later, best
    assert later[-1]["resumed_from"] >= 2, f"second run did not resume from last.pt: {best}"
    if kill[0] == "scancel":
        assert len(train) == 2 and _scontrol_job(victim)["JobState"] == "CANCELLED", train
        assert later[-1]["slurm_job_id"] == train[-1]["slurm"] != victim
    else:
        assert len(train) == 1 and later[-1]["slurm_job_id"] == victim, train
        assert int(_scontrol_job(victim)["Restarts"]) >= 1


@pytest.mark.skipif(
    os.environ.get("VAEFLOW_SLURM_TIMELIMIT_TEST") != "1",
    reason="real SLURM time limit takes ~3 min; set VAEFLOW_SLURM_TIMELIMIT_TEST=1 to run it",
)
def test_toy_train_time_limit_resumes(slurm_cluster, toy_case, make_rundir, start_snakemake):
    """A real TIMEOUT: 1 minute on the first attempt, then Snakemake's retry resumes."""
    toy_case.targets = ["results/vae/best.pt"]
    rundir = make_rundir(toy_case)
    profile = yaml.safe_load((rundir / "profiles/slurm/config.yaml").read_text())
    # --set-resources replaces the profile's whole key: repeat it, with a short first attempt
    train = dict(profile["set-resources"]["train"], runtime="1 if attempt == 1 else 10")
    steps = 100  # 1 s each: more than the 60-90 s SLURM grants a 1-minute job
    run = start_snakemake(
        rundir,
        toy_case,
        "--config",
        f"steps={steps}",
        "step_seconds=1",
        "--set-resources",
        *(f"train:{k}={v}" for k, v in train.items()),
    )
    rc = run.wait()
    assert rc == 0, f"snakemake exited {rc}\n{run.tail()}"
    subs = assert_went_through_slurm(run)
    train_jobs = [s for s in subs if s["rule"] == "train"]
    assert [s["state"] for s in train_jobs] == ["TIMEOUT", "COMPLETED"], train_jobs
    best = json.loads((rundir / "results/vae/best.pt").read_text())
    assert best["step"] == steps
    assert [r["slurm_job_id"] for r in best["runs"]] == [s["slurm"] for s in train_jobs], best
    assert best["runs"][-1]["resumed_from"] > 0, best


def test_vaeflow_pipeline_through_slurm(slurm_cluster, vaeflow_case, make_rundir, start_snakemake):
    rundir = make_rundir(vaeflow_case)
    run = start_snakemake(rundir, vaeflow_case)
    rc = run.wait()
    assert rc == 0, f"snakemake exited {rc}\n{run.tail()}"
    assert_targets(run)
    subs = assert_went_through_slurm(run)
    assert all(s["state"] == "COMPLETED" for s in subs), subs
