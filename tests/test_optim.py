"""Optimizers from the config: Adam/AdamW take torch's fused kernel by default, give the same
weights as torch's per-tensor loop, and `fused: false` keeps the loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vaeflow.trainer.optim import build_optimizer


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 1, 3, padding=1))


def train(cfg: dict, steps: int = 20) -> tuple[nn.Module, torch.optim.Optimizer]:
    net = small_net()
    opt = build_optimizer(net.parameters(), cfg)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.rand(4, 1, 8, 8, generator=gen)
        loss = (net(x) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net, opt


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_fused_by_default_and_same_weights_as_the_loop(kind):
    cfg = {"type": kind, "lr": 2e-3, "betas": [0.9, 0.99], "weight_decay": 0.01}
    fused_net, fused_opt = train(cfg)
    loop_net, loop_opt = train({**cfg, "fused": False})
    assert fused_opt.defaults["fused"] is True
    assert not loop_opt.defaults["fused"]
    for a, b in zip(fused_net.parameters(), loop_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # ... and the weights moved: the comparison is not between two untouched copies
    assert not torch.equal(next(fused_net.parameters()), next(small_net().parameters()))


def test_only_adam_kinds_are_fused():
    sgd = build_optimizer(small_net().parameters(), {"type": "SGD", "lr": 0.1})
    assert not sgd.defaults.get("fused")
    rms = build_optimizer(small_net().parameters(), {"type": "RMSprop", "lr": 0.1})
    assert not rms.defaults.get("fused")


def test_a_step_optimizer_of_another_type_does_not_inherit_the_defaults_keys():
    """An SGD step below AdamW defaults used to inherit AdamW's betas and die in torch."""
    import yaml

    from support import TINY
    from vaeflow import config as cfg

    raw = yaml.safe_load(TINY.read_text())
    raw["training"]["pipeline"]["steps"][1]["optimization"] = {
        "optimizers": {"discriminator": {"type": "SGD", "lr": 0.01}, "vae": {"type": "AdamW", "lr": 5e-4}}}
    gan = cfg.resolve_steps(cfg.validate(raw))[1]["optimization"]["optimizers"]
    assert gan["discriminator"] == {"type": "SGD", "lr": 0.01}
    assert gan["vae"]["type"] == "AdamW" and gan["vae"]["lr"] == 5e-4  # same type: still merges
