"""Kill -9 a stage mid-way, rerun it, and get bit-for-bit the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from support import run, tool_env

pytestmark = pytest.mark.slow


def long_tiny(project: Path) -> None:
    """Enough steps per stage to kill inside one: 3 epochs x 12 batches, a save every 3."""
    path = project / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["training"]["save_every"] = 3
    cfg["training"]["pipeline"]["defaults"]["max_steps"] = 12
    cfg["training"]["pipeline"]["defaults"]["grad_clip"] = 1.0
    for step in cfg["training"]["pipeline"]["steps"]:
        step["n_epochs"] = 3
    cfg["training"]["pipeline"]["steps"][1]["r1_gamma"] = 1.0
    path.write_text(yaml.safe_dump(cfg))


def train_cmd(stage: str) -> list[str]:
    return ["python", "scripts/train.py", "--config", "config/config.yaml", "--stage", stage]


def kill_after_checkpoint(project: Path, stage: str, min_step: int) -> None:
    """Start a stage, SIGKILL it once its resume checkpoint has passed min_step."""
    # Own session, so the kill reaches every process of the stage (torchrun's workers too),
    # as a scheduler killing the job would.
    proc = subprocess.Popen(train_cmd(stage), cwd=project, env=tool_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last = project / "results" / stage / "running" / "last.pt"
    deadline = time.time() + 240
    seen = None
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"{stage} finished before it could be killed")
            # A cheap stat each turn; a new file (the save renames over last.pt) stops the stage
            # while it is read, so a poller starved on a loaded machine cannot sleep through the
            # remaining saves and find the stage already published (a CI run did).
            try:
                st = last.stat()
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_ino, st.st_mtime_ns) != seen:
                os.killpg(proc.pid, signal.SIGSTOP)
                seen = (st.st_ino, st.st_mtime_ns)
                try:
                    step = torch.load(last, weights_only=True)["global_step"]
                except Exception:  # replaced between the stat and the load: read it next turn
                    seen, step = None, -1
                if step >= min_step:
                    break
                os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.01)
        else:
            raise AssertionError("no resume checkpoint appeared")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (project / "results" / stage / "best.pt").exists()  # nothing published yet


def kill_descendant(pid: int, marker: str) -> None:
    """SIGKILL the descendants of `pid` whose command line contains `marker` (only this test's
    processes: a pattern kill would also hit the same command run from another checkout)."""
    import psutil

    found = [p for p in psutil.Process(pid).children(recursive=True) if marker in " ".join(p.cmdline())]
    assert found, f"no {marker} process under {pid}"
    for p in found:
        p.kill()


def assert_same_tensors(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")


def test_sigkill_and_resume_is_bit_exact(tmp_path, tiny_data):
    from support import copy_prepared, make_project

    ref = make_project(tmp_path / "ref")
    cut = make_project(tmp_path / "cut")
    for p in (ref, cut):
        long_tiny(p)
        copy_prepared(tiny_data, p)
    # The uninterrupted reference trains beside the interrupted run (one thread each: 2 cores).
    reference = subprocess.Popen(" && ".join(" ".join(train_cmd(s)) for s in ("vae_warmup", "vae_gan")), shell=True,
                                 cwd=ref, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Warm-up killed once mid-epoch 1, GAN stage killed twice (epoch 1 and later).
        kill_after_checkpoint(cut, "vae_warmup", 5)
        log = run(train_cmd("vae_warmup"), cut).stdout
        assert "Resuming from checkpoint: step=1 (vae_warmup)" in log
        kill_after_checkpoint(cut, "vae_gan", 3)
        kill_after_checkpoint(cut, "vae_gan", 20)
        log = run(train_cmd("vae_gan"), cut).stdout
        assert "Resuming from checkpoint: step=2 (vae_gan)" in log
    finally:
        _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-4000:]

    for stage in ("vae_warmup", "vae_gan"):
        for name in ("last.pt", "best.pt"):
            a = torch.load(ref / "results" / stage / name, weights_only=True)
            b = torch.load(cut / "results" / stage / name, weights_only=True)
            assert a["global_step"] == b["global_step"]
            for key in ("model", "ema", "discriminator", "optimizers", "schedulers"):
                assert_same_tensors(a[key], b[key], f"{stage}/{name}:{key}")
        # metrics.jsonl: the resumed run rewrote no duplicate lines
        ref_lines = (ref / "results" / stage / "metrics.jsonl").read_text().splitlines()
        cut_lines = (cut / "results" / stage / "metrics.jsonl").read_text().splitlines()
        assert len(ref_lines) == len(cut_lines)


def test_snakemake_rerun_incomplete_resumes(project, tiny_data):
    from support import copy_prepared

    long_tiny(project)
    copy_prepared(tiny_data, project)
    # Snakemake runs the stage; kill its training process, as a node failure would.
    smk = subprocess.Popen(["snakemake", "--cores", "1", "results/vae_warmup/best.pt"], cwd=project, env=tool_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = project / "results" / "vae_warmup" / "running" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert last.exists()
    # Stopped while the training process is found and killed: the stage cannot finish meanwhile.
    os.killpg(smk.pid, signal.SIGSTOP)
    kill_descendant(smk.pid, "scripts/train.py")
    os.killpg(smk.pid, signal.SIGCONT)
    assert smk.wait(timeout=120) != 0
    assert last.exists()  # survived Snakemake's cleanup of the failed job's outputs
    run(["snakemake", "--cores", "1", "--rerun-incomplete", "results/vae_warmup/best.pt"], project)
    assert "Resuming from checkpoint: step=1 (vae_warmup)" in (project / "results" / "logs" / "train_vae_warmup.log").read_text()
    assert (project / "results" / "vae_warmup" / "best.pt").exists()


# ---------------------------------------------------------------- several processes and nodes
# One stage with warm-up steps then the GAN (disc_start 8, R1), 2 epochs x 8 steps, a resume
# checkpoint every 3 steps; two processes, on one node or on two (two torchrun launchers on
# loopback). Faults: a stuck worker (SIGSTOP) on one node, a killed one (SIGKILL) on two.
DIST_TIMEOUT_S = 20
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"}  # gloo between the ranks stays on 127.0.0.1


def dist_project(dest: Path, nproc: int, nnodes: int = 1) -> Path:
    from support import make_project

    project = make_project(dest)
    path = project / "config" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    t = cfg["training"]
    t["save_every"] = 3
    # One intra-op thread per process whatever the topology (cpu_threads is divided among a
    # node's processes): the thread count changes float reduction order, so 2 nodes x 1
    # process must run with the threads of 1 node x 2 processes to match it bit for bit.
    t["cpu_threads"] = nproc
    t["distributed"] = {"nproc_per_node": nproc, "nnodes": nnodes, "backend": "gloo", "timeout_s": DIST_TIMEOUT_S}
    t["pipeline"]["defaults"].update(max_steps=8, grad_clip=1.0)
    t["pipeline"]["steps"] = [{"name": "vae_gan", "n_epochs": 2, "gan_training": True, "disc_start": 8,
                               "lambda_adv": 0.1, "r1_gamma": 1.0}]
    path.write_text(yaml.safe_dump(cfg))
    run(["python", "scripts/prepare.py", "--config", "config/config.yaml"], project)
    return project


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_cmds(nnodes: int, port: int) -> list[list[str]]:
    """The command each node runs (README: the same on every machine)."""
    if nnodes == 1:
        return [train_cmd("vae_gan")]
    return [[*train_cmd("vae_gan"), "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "resume-test"]] * nnodes


def start_nodes(project: Path, nnodes: int, tag: str, fault: str = "") -> list[tuple[subprocess.Popen, Path]]:
    port, procs = free_port(), []
    for i, cmd in enumerate(node_cmds(nnodes, port)):
        log = project / f"{tag}-node{i}.log"
        with open(log, "w") as f:
            env = tool_env(**LOOPBACK, VAEFLOW_FAULT=fault)
            procs.append((subprocess.Popen(cmd, cwd=project, env=env, stdout=f, stderr=subprocess.STDOUT,
                                           start_new_session=True), log))
    return procs


def finish_nodes(procs, timeout: float) -> list[tuple[int, str]]:
    out = []
    for proc, log in procs:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"launcher {proc.pid} still running after {timeout} s:\n{log.read_text()[-3000:]}")
        out.append((rc, log.read_text()))
    return out


def worker_pid(launchers, rank: int) -> int:
    """The torchrun worker that holds `rank` among the launchers' descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            children.setdefault(int(rest.rsplit(") ", 1)[1].split()[1]), []).append(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    todo = [p.pid for p, _ in launchers]
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            env = []
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env):
            return pid
        todo += children.get(pid, [])
    raise AssertionError(f"no worker with rank {rank}")


def wait_for_checkpoint(project: Path, launchers, min_step: int) -> None:
    last = project / "results" / "vae_gan" / "running" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline:
        if any(p.poll() is not None for p, _ in launchers):
            raise AssertionError("a launcher ended before the fault: " + launchers[0][1].read_text()[-3000:])
        try:
            if torch.load(last, weights_only=True)["global_step"] >= min_step:
                return
        except Exception:  # not there yet, or caught between writes
            pass
        time.sleep(0.05)
    raise AssertionError("no resume checkpoint appeared")


def assert_same_run(ref: Path, cut: Path) -> None:
    for name in ("last.pt", "best.pt"):
        a = torch.load(ref / "results" / "vae_gan" / name, weights_only=True)
        b = torch.load(cut / "results" / "vae_gan" / name, weights_only=True)
        assert a["global_step"] == b["global_step"] == 16
        for key in ("model", "ema", "discriminator", "optimizers", "schedulers", "rng_ranks"):
            assert_same_tensors(a[key], b[key], f"{name}:{key}")
    lines = [(p / "results" / "vae_gan" / "metrics.jsonl").read_text().splitlines() for p in (ref, cut)]
    assert len(lines[0]) == len(lines[1])


@pytest.fixture(scope="module")
def two_process_ref(tmp_path_factory) -> Path:
    """An uninterrupted 2-process run on one node: what every faulty run must reproduce."""
    ref = dist_project(tmp_path_factory.mktemp("dist") / "ref", nproc=2)
    [(rc, log)] = finish_nodes(start_nodes(ref, 1, "ref"), 600)
    assert rc == 0, log[-3000:]
    assert "Data parallel over 2 processes: 16 images each per batch" in log
    return ref


def test_two_processes_stuck_worker_times_out_and_resume_is_bit_exact(tmp_path, two_process_ref):
    cut = dist_project(tmp_path / "cut", nproc=2)
    # Rank 1 stops itself (SIGSTOP) at step 7, after the step-6 checkpoint: a hung worker,
    # alive, never reaching the next collective. A signal from the test instead could land
    # after the last collective of the stage (8 steps), and then nothing can time out.
    launchers = start_nodes(cut, 1, "cut", fault="stop@step:7:rank=1")
    wait_for_checkpoint(cut, launchers, 6)
    stuck = worker_pid(launchers, 1)
    t0 = time.time()
    try:
        [(rc, log)] = finish_nodes(launchers, DIST_TIMEOUT_S + 120)
    finally:
        subprocess.run(["kill", "-KILL", str(stuck)], capture_output=True)
    # Rank 0 waits timeout_s in its collective, asks which ranks still answer (10 s at most),
    # exits; torchrun then stops the stuck worker (SIGTERM, SIGKILL after 5 s): about 35 s,
    # measured 66 s on 2 cores shared with a dozen other processes.
    assert rc == 1 and time.time() - t0 < DIST_TIMEOUT_S + 90, log[-3000:]
    [line] = [l for l in log.splitlines() if l.startswith("vaeflow: error: training failed:")]
    assert "rank 0 (local rank 0" in line and "rank(s) 1 did not answer" in line
    assert f"training.distributed.timeout_s={DIST_TIMEOUT_S}" in line
    assert "Traceback" not in log

    [(rc, log)] = finish_nodes(start_nodes(cut, 1, "rerun"), 600)
    assert rc == 0 and "Resuming from checkpoint: step=1 (vae_gan)" in log, log[-3000:]
    assert_same_run(two_process_ref, cut)


def test_two_nodes_on_loopback_match_one_node_and_resume_after_sigkill(tmp_path, two_process_ref):
    cut = dist_project(tmp_path / "cut", nproc=1, nnodes=2)
    # Rank 1 dies (SIGKILL) at step 7, after the step-6 checkpoint, while rank 0 still has
    # collectives ahead of it (a kill from the test could land after the last one).
    launchers = start_nodes(cut, 2, "cut", fault="kill@step:7:rank=1")
    ended = finish_nodes(launchers, DIST_TIMEOUT_S + 120)
    assert all(rc == 1 for rc, _ in ended), [log[-2000:] for _, log in ended]
    lines = [l for _, log in ended for l in log.splitlines() if l.startswith("vaeflow: error: training failed:")]
    assert len(lines) == 2, [log[-3000:] for _, log in ended]  # one per node
    assert any("rank 1 (local rank 0" in l and "was killed by SIGKILL" in l for l in lines), lines
    # The other node: its worker lost rank 1 (a CollectiveError), or, when the killed worker's
    # node hosted the rendezvous store, its launcher lost the store.
    assert any("rank 0 (local rank 0" in l or "this node lost the rendezvous at 127.0.0.1" in l for l in lines), lines
    assert all("Traceback" not in log for _, log in ended)

    resumed = finish_nodes(start_nodes(cut, 2, "rerun"), 600)
    assert all(rc == 0 for rc, _ in resumed), [log[-3000:] for _, log in resumed]
    assert "Resuming from checkpoint: step=1 (vae_gan)" in "".join(log for _, log in resumed)
    # Two launchers, c10d rendezvous, one process each: bit for bit the one-node run.
    assert_same_run(two_process_ref, cut)
