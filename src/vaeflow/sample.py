"""Sample grids from a trained stage (seed 000's sampler): reconstructions and prior samples."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import save_image

from vaeflow.checkpoint import atomic_write
from vaeflow.models.loading import load_autoencoder
from vaeflow.trainer.stage import _to_model_range, _to_unit


class SampleError(ValueError):
    pass


def latest_run(checkpoints_root: str | Path) -> str:
    """The most recently updated stage directory holding a best.pt or last.pt (seed 000)."""
    root = Path(checkpoints_root)
    runs = [d for d in root.iterdir() if d.is_dir() and ((d / "best.pt").exists() or (d / "last.pt").exists())] if root.is_dir() else []
    if not runs:
        raise SampleError(f"no stage directory with best.pt or last.pt under {root}")
    return max(runs, key=lambda d: max(f.stat().st_mtime for f in d.glob("*.pt"))).name


def _middle_slice(x: torch.Tensor) -> torch.Tensor:
    return x[:, :, x.shape[2] // 2] if x.dim() == 5 else x


@torch.no_grad()
def sample_run(checkpoints_root, run_name=None, checkpoint="best", samples=64, data_dir=None, seed=0) -> list[Path]:
    from vaeflow.data import PreparedDataset

    root = math.isqrt(samples)
    if root * root != samples:
        raise SampleError(f"--samples must be a perfect square (4, 9, 16, ...), got {samples}")
    run_name = run_name or latest_run(checkpoints_root)
    run_dir = Path(checkpoints_root) / run_name
    labels = ["best", "last"] if checkpoint == "both" else [checkpoint]
    data_dir = Path(data_dir) if data_dir else Path(checkpoints_root) / "data"
    written = []
    for label in labels:
        model, _ = load_autoencoder(run_dir / f"{label}.pt")
        ds = PreparedDataset(data_dir, "test")
        x = torch.stack(ds.__getitems__(list(range(min(samples, len(ds))))))
        recon = _to_unit(model.ae_forward(_to_model_range(x, model), sample_posterior=False).recon.float(), model)
        g = torch.Generator().manual_seed(seed)
        z = model.sample_prior(samples, generator=g)
        gen = _to_unit(model.decode_latent(z).float(), model)
        # Originals and reconstructions side by side: each row alternates original/recon pairs.
        pairs = torch.stack([_middle_slice(x), _middle_slice(recon)], 1).flatten(0, 1)
        for name, imgs, nrow in (
            (f"vae_recon_grid_{label}.png", pairs, 2 * root if root % 2 == 0 else 2),
            (f"vae_generated_grid_{label}.png", _middle_slice(gen), root),
        ):
            out = run_dir / "samples" / name
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out, lambda f, imgs=imgs, nrow=nrow: save_image(imgs, f, nrow=nrow, format="png"))
            written.append(out)
    return written
