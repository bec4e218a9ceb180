"""Every optimizer type x use_amp (fp32, bf16, fp16 with a GradScaler) x disc_start (0 and
later) runs GAN steps without an error. fp16 on CPU uses GradScaler("cpu"), standing in
for the CUDA scaler the trainer builds there (trainer/precision.py)."""

from __future__ import annotations

import pytest
import torch

from invariants.trainers import trainer

OPTIMIZERS = [
    {"type": "Adam"},  # fused by default on CPU
    {"type": "AdamW", "fused": False},
    {"type": "SGD", "momentum": 0.9},
    {"type": "RMSprop"},
]


@pytest.mark.parametrize("amp", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("disc_start", [0, 2])
@pytest.mark.parametrize("opt", OPTIMIZERS, ids=[o["type"] + ("" if o.get("fused", True) else "-unfused") for o in OPTIMIZERS])
def test_gan_steps_run(tmp_path, opt, amp, disc_start):
    lr = {"lr": 1e-3}
    t = trainer(tmp_path, "kl", gan_training=True, lambda_adv=0.5, disc_start=disc_start, max_steps=3, batch_size=8,
                use_amp="bf16" if amp == "bf16" else "fp32",
                optimization={"optimizers": {"vae": {**opt, **lr}, "discriminator": {**opt, **lr}}})
    if amp == "fp16":
        t.devices.amp_dtype = torch.float16
        t.opts.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        t.guard.scaler_enabled = True
    d_before = [p.detach().clone() for p in t.models.discriminator.parameters()]
    t.run()
    assert t.state.global_step == 3
    d_moved = any(not torch.equal(a, b) for a, b in zip(d_before, t.models.discriminator.parameters()))
    assert d_moved, "the discriminator trained from disc_start"
