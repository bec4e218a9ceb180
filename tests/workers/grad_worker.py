"""Gradients after averaging over ranks, per model (tests/test_grad_sync.py).

Run in-process (one rank, the reference) or under torchrun with 2 ranks; each case
computes the trainer's generator loss on its rank's slice of the same fixed global batch
(posterior mode: no noise), averages the gradients, and the results are saved per rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from vaeflow import collectives
from vaeflow.losses import AdversarialLoss, KLLoss, ReconstructionLoss
from vaeflow.models import build_discriminator, build_model
from vaeflow.trainer.distributed import Dist, init_from_env

BACKBONE = dict(in_channels=1, resolution=8, base_ch=8, ch_mult=[1, 2], num_res_blocks=1, norm_groups=4)
KL = dict(type="autoencoder_kl", embed_dim=2, z_channels=2, **BACKBONE)
CASES = {
    "kl": KL,
    "kl_gan": KL,  # + hinge generator loss with the adaptive weight
    "kl_overlap": KL,  # averaged by the bucketed reducer armed during backward
    "vq": dict(type="vqvae", codebook_size=32, embed_dim=4, **BACKBONE),  # EMA codebook, dead-code restart
    "lfq": dict(type="magvit", quantizer="lfq", codebook_size=16, entropy_weight=0.5, inv_temperature=10.0, **BACKBONE),
    "lfq_inplace": dict(type="magvit", quantizer="lfq", codebook_size=16, entropy_weight=0.5, inv_temperature=10.0, **BACKBONE),
    "fsq": dict(type="magvit", quantizer="fsq", levels=[5, 5, 3], **BACKBONE),
}
GLOBAL_BATCH = 8


def _inplace_mean(t: torch.Tensor) -> torch.Tensor:
    """The old LFQ code: an in-place all-reduce autograd cannot see (the control case)."""
    t = t.clone()
    if collectives.active():
        torch.distributed.all_reduce(t)
        t = t / collectives.world()
    return t


def case_grads(name: str, dist: Dist) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(CASES[name]).train()
    disc = build_discriminator({"ndf": 8, "n_layers": 1, "norm": "group"}, 1) if name == "kl_gan" else None
    x = torch.rand(GLOBAL_BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = x[dist.shard(torch.arange(GLOBAL_BATCH))]
    # kl_overlap: 1 kB buckets, so several all-reduces start during backward
    reducer = dist.reducer(model.parameters(), bucket_mb=2**-10) if name == "kl_overlap" else None
    if reducer is not None:
        reducer.arm()
    saved = collectives.mean_differentiable
    if name == "lfq_inplace":
        collectives.mean_differentiable = _inplace_mean
    try:
        out = model.ae_forward(x, sample_posterior=False)
    finally:
        collectives.mean_differentiable = saved
    nll = ReconstructionLoss("mse")(out.recon, x)
    loss = nll
    if out.posterior is not None:
        loss = loss + 1e-2 * KLLoss()(out.posterior.mean, out.posterior.logvar)[0]
    if out.reg_loss is not None:
        loss = loss + out.reg_loss
    if disc is not None:
        adv, _, _ = AdversarialLoss(0.5, 0, 0.0, True).generator(disc, out.recon, nll, model.last_layer_weight())
        loss = loss + adv
    loss.backward()
    if reducer is not None:
        reducer.finish()
        reducer.remove()
    else:
        dist.average_grads(list(model.parameters()))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def unused_grads(dist: Dist) -> dict:
    """Layer b has a gradient on rank 0 only, layer c on no rank."""
    torch.manual_seed(0)
    a, b, c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
    h = a(torch.ones(2, 3) * (dist.rank + 1))
    if dist.rank == 0:
        h = b(h)
    h.sum().backward()
    local_b = None if b.weight.grad is None else b.weight.grad.clone()
    dist.average_grads([*a.parameters(), *b.parameters(), *c.parameters()])
    return {"a": a.weight.grad, "b": b.weight.grad, "b_local": local_b, "c": c.weight.grad}


def main(out_dir: str) -> None:
    init_from_env({"backend": "gloo", "timeout_s": 60})
    dist = Dist()
    result = {name: case_grads(name, dist) for name in CASES}
    result["unused"] = unused_grads(dist)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(result, Path(out_dir) / f"rank{dist.rank}.pt")
    if dist.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
