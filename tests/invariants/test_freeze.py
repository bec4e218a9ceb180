"""Frozen means bit-identical: after a stage, every parameter and buffer of a frozen part,
in the model and in its EMA, equals its value at the start of the stage (BatchNorm
statistics, the VQ codebook's EMA statistics and dead-code restarts included)."""

from __future__ import annotations

import pytest
import torch

from invariants.trainers import trainer
from vaeflow.trainer.build import frozen_modules


def snapshot(t) -> dict[str, torch.Tensor]:
    """Every tensor of the frozen parts, in the model and the EMA, by module path."""
    names = {id(m): n for n, m in t.models.model.named_modules()}
    out = {}
    for m in frozen_modules(t.models):
        if m is t.models.discriminator:
            out.update({"D." + k: v.clone() for k, v in m.state_dict().items()})
            continue
        path = names[id(m)]
        out.update({f"model.{path}.{k}": v.clone() for k, v in m.state_dict().items()})
        if t.models.ema is not None:
            ema = t.models.ema.model.get_submodule(path)
            out.update({f"ema.{path}.{k}": v.clone() for k, v in ema.state_dict().items()})
    return out


CASES = [
    ("kl", ["encoder"], {}),
    ("vq", ["quantizer"], {}),  # the EMA codebook and its dead-code restarts
    ("vq", ["encoder", "quantizer"], {}),
    ("lfq", ["encoder"], {}),
    ("fsq", ["decoder"], {}),
    ("cnn_bn", ["encoder"], {}),  # BatchNorm running statistics
    # the discriminator-only path: the generator is wholly frozen and runs in eval mode
    ("cnn_bn", ["encoder", "decoder"], dict(train_vae=False, gan_training=True, lambda_adv=1.0)),
    ("kl", ["discriminator"], dict(gan_training=True, lambda_adv=0.5)),
]


@pytest.mark.parametrize("family,freeze,extra", CASES, ids=[f"{f}-{'+'.join(p)}" for f, p, _ in CASES])
def test_frozen_parts_are_bit_identical(tmp_path, family, freeze, extra):
    t = trainer(tmp_path, family, freeze=freeze, max_steps=3, batch_size=8, training={"ema_decay": 0.9}, **extra)
    assert t.models.ema is not None
    before = snapshot(t)
    assert before, "the frozen parts hold tensors"
    t.run()
    after = snapshot(t)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"frozen {freeze} of {family} changed: {changed[:5]}"
    if "discriminator" not in freeze:  # and the stage did train something
        trained = [p for p in t.models.model.parameters() if p.requires_grad]
        assert not trained or t.state.global_step == 3
