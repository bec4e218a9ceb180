"""Gradients averaged over 2 ranks equal the gradients of 1 rank on the same global batch.

The control case (LFQ's entropy averaged with an in-place all-reduce, the old code) must
differ: that is the bug class this test exists to catch.
"""

from __future__ import annotations

import sys

import pytest
import torch

from support import REPO, run

pytestmark = pytest.mark.slow
WORKER = REPO / "tests" / "workers" / "grad_worker.py"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


@pytest.fixture(scope="module")
def grads(tmp_path_factory):
    out = tmp_path_factory.mktemp("grads")
    run([sys.executable, str(WORKER), str(out / "one")], REPO)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
         str(out / "two")], REPO)
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    return load(out / "one" / "rank0.pt"), load(out / "two" / "rank0.pt"), load(out / "two" / "rank1.pt")


@pytest.mark.parametrize("case", ["kl", "kl_gan", "kl_overlap", "vq", "lfq", "fsq"])
def test_two_ranks_match_one(grads, case):
    one, r0, r1 = (g[case] for g in grads)
    assert one.keys() == r0.keys() == r1.keys() and len(one) > 10
    scale = float(flat(one).abs().max())
    for name, ref in one.items():
        assert torch.equal(r0[name], r1[name]), f"{case}: ranks hold different gradients for {name}"
        # Relative 1e-5 per element; elements near zero (e.g. attention key biases, whose exact
        # gradient is 0) are compared at 1e-5 of the model's largest gradient instead.
        torch.testing.assert_close(r0[name], ref, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{case}: {name}: {m}")
    assert rel_err(flat(r0), flat(one)) < 1e-5


def test_inplace_entropy_all_reduce_is_caught(grads):
    """The old in-place all-reduce gives the entropy term 1/world of its gradient."""
    one, r0, _ = (g["lfq_inplace"] for g in grads)
    assert rel_err(flat(r0), flat(one)) > 1e-3


def test_unused_parameters_are_zero_filled(grads):
    _, r0, r1 = (g["unused"] for g in grads)
    assert torch.equal(r0["a"], r1["a"])
    assert r1["b_local"] is None and r0["b_local"] is not None
    assert torch.equal(r0["b"], r1["b"]) and torch.allclose(r0["b"], r0["b_local"] / 2)
    assert r0["c"] is None and r1["c"] is None  # unused on every rank: stays None, as in one process
