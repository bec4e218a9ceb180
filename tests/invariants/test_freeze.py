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


@pytest.mark.slow
def test_a_snakemake_stage_leaves_its_frozen_parts_bit_identical(tmp_path, tiny_data):
    """From the checkpoints of a real run: the GAN stage freezes the encoder (and quant_conv),
    so its best.pt holds, in the model and in the EMA, the warm-up's weights it started from."""
    import yaml

    from support import copy_prepared, make_project, run
    from vaeflow import checkpoint as ckpt

    p = make_project(tmp_path / "project")
    path = p / "config" / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["training"]["ema_decay"] = 0.9
    raw["training"]["pipeline"]["steps"][1]["freeze"] = ["encoder"]
    path.write_text(yaml.safe_dump(raw))
    copy_prepared(tiny_data, p)
    run(["snakemake", "--cores", "2", "results/vae_gan/best.pt"], p)
    warm = ckpt.load_vaeflow(p / "results" / "vae_warmup" / "best.pt")
    gan = ckpt.load_vaeflow(p / "results" / "vae_gan" / "best.pt")
    start = warm["ema"]  # a stage starts from its prior's EMA weights
    frozen = [k for k in start if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and gan["global_step"] > 0
    for where in ("model", "ema"):
        changed = [k for k in frozen if not torch.equal(gan[where][k], start[k])]
        assert not changed, f"vae_gan {where}: frozen tensors changed: {changed[:5]}"
    assert any(not torch.equal(gan["model"][k], start[k]) for k in start if k.startswith("decoder."))
