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
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"{stage} finished before it could be killed")
            if last.exists():
                try:
                    step = torch.load(last, weights_only=True)["global_step"]
                except Exception:  # caught between writes: the rename is atomic, so retry
                    step = -1
                if step >= min_step:
                    break
            time.sleep(0.05)
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
        time.sleep(0.05)
    assert last.exists()
    kill_descendant(smk.pid, "scripts/train.py")
    assert smk.wait(timeout=120) != 0
    assert last.exists()  # survived Snakemake's cleanup of the failed job's outputs
    run(["snakemake", "--cores", "1", "--rerun-incomplete", "results/vae_warmup/best.pt"], project)
    assert "Resuming from checkpoint: step=1 (vae_warmup)" in (project / "results" / "logs" / "train_vae_warmup.log").read_text()
    assert (project / "results" / "vae_warmup" / "best.pt").exists()
