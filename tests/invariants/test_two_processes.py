"""2 processes equal 1 (gloo, through torchrun): with a parameter unused on one rank while
the discriminator's gradients are averaged too, and when one rank runs out of memory
(VAEFLOW_FAULT=oom): every rank then splits its batches together and the run matches a
run without the fault."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml

from support import REPO, TINY, make_project, run

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
WORKER = str(REPO / "tests" / "workers" / "reducer_order_worker.py")


def reduce(tmp_path, groups: str) -> list[dict]:
    out = tmp_path / groups
    res = run([*TORCHRUN, WORKER, str(out), groups], REPO, check=False, timeout=300)
    return res, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1) if (out / f"rank{r}.pt").exists()]


def matches(result: dict) -> bool:
    return all(torch.allclose(g, e, rtol=1e-6, atol=1e-7) for g, e in zip(result["got"], result["expected"]))


def test_two_processes_equal_one_with_an_unused_parameter(tmp_path):
    res, ranks = reduce(tmp_path, "own")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(ranks) == 2 and all(matches(r) for r in ranks)
    # the control: one group for both reducers pairs the generator's buckets with the
    # discriminator's on the ranks whose graphs differ (a wrong average or an error)
    res, ranks = reduce(tmp_path, "shared")
    assert res.returncode != 0 or not all(matches(r) for r in ranks)


def gan_project(dest, **env):
    raw = yaml.safe_load(TINY.read_text())
    t = raw["training"]
    t["batch_size"] = 16
    t["distributed"] = {"nproc_per_node": 2, "backend": "gloo", "timeout_s": 60}
    # SGD: Adam divides by sqrt(v), which turns float noise in a gradient that is zero in exact
    # arithmetic (attention's key bias) into steps of size lr; SGD keeps it noise
    sgd = {"type": "SGD", "lr": 0.05, "momentum": 0.9}
    t["pipeline"]["steps"] = [{"name": "s", "n_epochs": 1, "max_steps": 4, "gan_training": True, "lambda_adv": 0.1,
                               "adaptive_weight": False, "lambda_lecam": 0.1, "allow_microbatching": True}]
    t["pipeline"]["defaults"]["optimization"] = {"optimizers": {"vae": sgd, "discriminator": sgd}}
    dest.mkdir(parents=True)
    (dest / "c.yaml").write_text(yaml.safe_dump(raw))
    p = make_project(dest / "project", dest / "c.yaml")
    run(["python", "scripts/prepare.py", "--config", "config/config.yaml"], p)
    return p


def test_out_of_memory_on_one_rank_splits_every_rank(tmp_path):
    train = ["python", "scripts/train.py", "--config", "config/config.yaml", "--stage", "s"]
    ref, cut = gan_project(tmp_path / "ref"), gan_project(tmp_path / "cut")
    run(train, ref)
    log = run(train, cut, VAEFLOW_FAULT="oom@step:2:rank=1").stdout
    assert "CUDA out of memory on another rank: splitting each batch into 2 micro-batches" in log
    a = torch.load(ref / "results" / "s" / "last.pt", weights_only=True)
    b = torch.load(cut / "results" / "s" / "last.pt", weights_only=True)
    assert a["micro"] == 1 and b["micro"] == 2 and a["global_step"] == b["global_step"] == 4
    for part in ("model", "discriminator"):
        for k, v in a[part].items():
            if v.is_floating_point():
                torch.testing.assert_close(b[part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")
