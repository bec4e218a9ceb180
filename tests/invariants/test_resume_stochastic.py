"""Resume is bit-exact with every stochastic option on: dynamic binarization, posterior
sampling, dead-code restarts and LeCAM, in 1 and 2 processes. A stage killed (SIGKILL,
VAEFLOW_FAULT=kill) mid-epoch and rerun ends with the same bits as an uninterrupted one."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from invariants.trainers import FAMILIES
from support import TINY, make_project, run

pytestmark = pytest.mark.slow
TRAIN = ["python", "scripts/train.py", "--config", "config/config.yaml", "--stage", "s"]


def project(dest, family: str, nproc: int):
    raw = yaml.safe_load(TINY.read_text())
    raw["data"]["binarize"] = "dynamic"  # a fresh Bernoulli draw of every image in every epoch
    raw["model"] = dict(FAMILIES[family])
    t = raw["training"]
    t["save_every"] = 2
    t["batch_size"] = 16
    t["ema_decay"] = 0.9
    if nproc > 1:
        t["distributed"] = {"nproc_per_node": nproc, "backend": "gloo", "timeout_s": 60}
    t["pipeline"]["steps"] = [{"name": "s", "n_epochs": 2, "max_steps": 4, "gan_training": True, "lambda_adv": 0.1,
                               "lambda_lecam": 0.1}]
    path = dest / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    p = make_project(dest / "project", path)
    run(["python", "scripts/prepare.py", "--config", "config/config.yaml"], p)
    return p


def same(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")


@pytest.mark.parametrize("family,nproc", [("kl", 1), ("vq", 1), ("kl", 2)])
def test_kill_and_resume_is_bit_exact_with_stochastic_options(tmp_path, family, nproc):
    ref = project(tmp_path / "ref", family, nproc)
    cut = tmp_path / "cut"
    shutil.copytree(ref, cut)
    run(TRAIN, ref)
    killed = run(TRAIN, cut, check=False, VAEFLOW_FAULT="kill@step:7")  # epoch 2; last.pt holds step 6
    assert killed.returncode != 0 and not (cut / "results" / "s" / "best.pt").exists()
    log = run(TRAIN, cut).stdout
    assert "Resuming from checkpoint: step=1 (s), epoch=2, batch=2" in log
    for name in ("best.pt", "last.pt"):
        a = torch.load(ref / "results" / "s" / name, weights_only=True)
        b = torch.load(cut / "results" / "s" / name, weights_only=True)
        assert a["global_step"] == b["global_step"] == 8
        for key in ("model", "ema", "discriminator", "optimizers", "lecam"):
            same(a[key], b[key], f"{family}/{nproc} {name}:{key}")
