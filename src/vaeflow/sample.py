"""Sampling from a trained stage: one function per strategy, and `sample_run` for the CLI/rules.

Strategies, each returning a `Grid` of tiles in [0, 1]:

- `reconstruction_grid`: test images and their reconstructions, side by side;
- `random_samples`: decoded draws from the model's prior (`sample_prior`): N(0, I) for KL
  models (for spatial latents every latent pixel independently, and the output says so),
  uniform codebook entries for VQ models;
- `latent_grid`: a 2D sweep of two chosen latent dimensions over a range, others fixed;
- `traversal`: one row per latent dimension, swept over the range, others fixed;
- `interpolation`: linear paths between the latents of two encoded test images.

Latent dimensions are indices into the flattened latent (`C*H*W` for spatial latents).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vaeflow.checkpoint import atomic_write
from vaeflow.data.dataset import stack_items
from vaeflow.config import schema_defaults
from vaeflow.layout import MANIFEST, Layout, StageLayout
from vaeflow.grid import make_grid, to_uint8
from vaeflow.metrics import to_model_range as _to_model_range
from vaeflow.metrics import to_unit as _to_unit
from vaeflow.models.loading import load_autoencoder


class SampleError(ValueError):
    pass


@dataclass
class Grid:
    tiles: torch.Tensor  # [N, C, H, W] in [0, 1]
    nrow: int  # tiles per row
    description: str


def latest_run(checkpoints_root: str | Path) -> str:
    """The most recently updated stage directory holding a best.pt or last.pt."""
    root = Path(checkpoints_root)
    stages = [StageLayout(root, d.name) for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    ckpts = {s.stage: [p for p in (s.best, s.last) if p.exists()] for s in stages}
    ckpts = {name: paths for name, paths in ckpts.items() if paths}
    if not ckpts:
        raise SampleError(f"no stage directory with best.pt or last.pt under {root}")
    return max(ckpts, key=lambda name: max(p.stat().st_mtime for p in ckpts[name]))


def check_square(samples: int) -> int:
    root = math.isqrt(samples) if samples > 0 else 0
    if samples < 1 or root * root != samples:
        raise SampleError(f"--samples must be a perfect square (4, 9, 16, 25, ...), got {samples}")
    return root


def _middle_slice(x: torch.Tensor) -> torch.Tensor:
    return x[:, :, x.shape[2] // 2] if x.dim() == 5 else x


def _decode(model, z: torch.Tensor) -> torch.Tensor:
    p = next(model.parameters())
    return _middle_slice(_to_unit(model.decode_latent(z.to(p.device, p.dtype)).float(), model).cpu())


def _encode(model, x: torch.Tensor) -> torch.Tensor:
    p = next(model.parameters())
    return model.encode_latent(_to_model_range(x, model).to(p.device, p.dtype)).float().cpu()


def _latent_dims(model) -> int:
    return int(math.prod(model.latent_shape))


def _check_dims(model, dims, key: str) -> list[int]:
    n = _latent_dims(model)
    dims = [int(d) for d in dims]
    bad = [d for d in dims if not 0 <= d < n]
    if bad:
        raise SampleError(f"sampling.{key} {bad} out of range: the latent has {n} dimensions "
                          f"(flattened {'x'.join(map(str, model.latent_shape))}), indices 0..{n - 1}")
    return dims


# ----------------------------------------------------------------------------- strategies


@torch.no_grad()
def reconstruction_grid(model, x: torch.Tensor) -> Grid:
    """2N tiles: each original followed by its reconstruction (posterior mode / quantized)."""
    p = next(model.parameters())
    out = model.ae_forward(_to_model_range(x, model).to(p.device, p.dtype), sample_posterior=False)
    recon = _middle_slice(_to_unit(out.recon.float(), model).cpu())
    pairs = torch.stack([_middle_slice(x), recon], 1).flatten(0, 1)
    root = math.isqrt(x.shape[0])
    nrow = 2 * root if root * root == x.shape[0] and root % 2 == 0 else 2
    return Grid(pairs, nrow, f"{x.shape[0]} test images (odd tiles) and their reconstructions (even tiles)")


def prior_description(model, family: str) -> str:
    shape = "x".join(map(str, model.latent_shape))
    if family == "vq":
        return ("random samples decode codes drawn uniformly from the codebook at every latent position "
                f"(latent {shape}): a VQ model has no learned prior here, so expect textures rather than objects")
    if len(model.latent_shape) > 1:
        return (f"random samples decode N(0, I) latents of shape {shape}: a spatial KL latent, every latent pixel drawn "
                "independently from the KL prior N(0, I). That is what the KL term pulls towards, not a learned "
                "prior; with a small kl_beta the decoded samples need not look like data")
    return f"random samples decode z ~ N(0, I) in {shape} dimensions (the VAE prior)"


@torch.no_grad()
def random_samples(model, n: int, generator: torch.Generator | None = None, family: str = "kl") -> Grid:
    z = model.sample_prior(n, generator=generator)
    return Grid(_decode(model, z), math.isqrt(n) if math.isqrt(n) ** 2 == n else 8, prior_description(model, family))


@torch.no_grad()
def latent_grid(model, base: torch.Tensor, dims=(0, 1), value_range=(-3.0, 3.0), steps: int = 8) -> Grid:
    """steps x steps tiles: row r sets dims[0] to v[r], column c sets dims[1] to v[c]
    (v = linspace over value_range); every other dimension keeps `base` ([*latent_shape])."""
    d0, d1 = _check_dims(model, dims, "latent_dims")
    v = torch.linspace(float(value_range[0]), float(value_range[1]), steps)
    z = base.flatten().repeat(steps * steps, 1)
    z[:, d0] = v.repeat_interleave(steps)
    z[:, d1] = v.repeat(steps)
    desc = (f"latent dims {d0} (rows, top to bottom) and {d1} (columns, left to right) swept over "
            f"[{value_range[0]:g}, {value_range[1]:g}] in {steps} steps; other dims fixed")
    return Grid(_decode(model, z.view(-1, *model.latent_shape)), steps, desc)


@torch.no_grad()
def traversal(model, base: torch.Tensor, dims, value_range=(-3.0, 3.0), steps: int = 8) -> Grid:
    """len(dims) rows x steps tiles: row i sweeps dims[i] over value_range, others fixed at base."""
    dims = _check_dims(model, dims, "traversal_dims")
    v = torch.linspace(float(value_range[0]), float(value_range[1]), steps)
    z = base.flatten().repeat(len(dims) * steps, 1)
    for i, d in enumerate(dims):
        z[i * steps : (i + 1) * steps, d] = v
    desc = (f"one row per latent dim {dims}, each swept over [{value_range[0]:g}, {value_range[1]:g}] "
            f"in {steps} steps; other dims fixed")
    return Grid(_decode(model, z.view(-1, *model.latent_shape)), steps, desc)


@torch.no_grad()
def interpolation(model, xa: torch.Tensor, xb: torch.Tensor, steps: int = 8) -> Grid:
    """One row per pair: image a, `steps` decodings of (1 - t) z_a + t z_b for t in [0, 1],
    image b. So each row has steps + 2 tiles."""
    za, zb = _encode(model, xa), _encode(model, xb)
    t = torch.linspace(0, 1, steps).view(1, steps, *([1] * (za.dim() - 1)))
    z = ((1 - t) * za[:, None] + t * zb[:, None]).flatten(0, 1)
    dec = _decode(model, z).view(xa.shape[0], steps, *_middle_slice(xa).shape[1:])
    rows = torch.cat([_middle_slice(xa)[:, None], dec, _middle_slice(xb)[:, None]], 1).flatten(0, 1)
    return Grid(rows, steps + 2, f"{xa.shape[0]} rows: test image, {steps} decodings of the linear path between "
                                 "the two images' latents (encode_latent), second test image")


# ----------------------------------------------------------------------------- helpers


@torch.no_grad()
def model_family(model, x: torch.Tensor) -> str:
    p = next(model.parameters())
    out = model.ae_forward(_to_model_range(x[:1], model).to(p.device, p.dtype), sample_posterior=False)
    return "kl" if out.posterior is not None else "vq"


@torch.no_grad()
def most_informative_dims(model, x: torch.Tensor, n: int) -> list[int]:
    """The n latent dims with the largest mean KL(q(z_d|x) || N(0, 1)) over x (KL models), or
    the largest variance of encode_latent over x (others); ties go to the lower index."""
    p = next(model.parameters())
    xm = _to_model_range(x, model).to(p.device, p.dtype)
    post = model.ae_forward(xm, sample_posterior=False).posterior
    if post is not None:
        m, lv = post.mean.float().flatten(1), post.logvar.float().flatten(1)
        score = (0.5 * (m**2 + lv.exp() - 1 - lv)).mean(0)
    else:
        score = model.encode_latent(xm).float().flatten(1).var(0, unbiased=False)
    n = min(n, score.numel())
    order = sorted(range(score.numel()), key=lambda d: (-float(score[d]), d))
    return order[:n]


MIN_TILE = 48  # smaller tiles are enlarged (nearest neighbour, integer factor) for viewing


def display_scale(tiles: torch.Tensor) -> int:
    """Integer enlargement so tiles are at least MIN_TILE pixels on their longer side."""
    side = max(tiles.shape[-2:])
    return max(1, math.ceil(MIN_TILE / side))


def save_grid(grid: Grid, path: str | Path, title: str = "") -> Path:
    """PNG of the grid (torchvision's make_grid layout, padding 2) with the description as
    PNG text. Tiles smaller than MIN_TILE pixels are enlarged by an integer factor (nearest
    neighbour, so every original pixel stays a uniform block; the factor is in the PNG text)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    tiles = grid.tiles.clamp(0, 1)
    scale = display_scale(tiles)
    if scale > 1:
        tiles = torch.nn.functional.interpolate(tiles, scale_factor=scale, mode="nearest")
    img = make_grid(tiles, nrow=grid.nrow, padding=2)
    arr = to_uint8(img)
    info = PngInfo()
    info.add_text("Title", title)
    info.add_text("Description", grid.description)
    info.add_text("Software", "vaeflow")
    info.add_text("Enlargement", f"{scale}x nearest neighbour")
    path = Path(path)
    atomic_write(path, lambda f: Image.fromarray(arr).save(f, format="png", pnginfo=info))
    return path


def _images(ds, n: int, offset: int = 0) -> torch.Tensor:
    return stack_items(ds, [(offset + i) % len(ds) for i in range(n)])


@torch.no_grad()
def sample_run(checkpoints_root, run_name=None, checkpoint="best", samples=64, data_dir=None, seed=0,
               sampling_cfg: dict | None = None, log=None, device: str | torch.device = "cpu") -> list[Path]:
    """Every strategy for `run_name` (default: the most recently updated run), for the `best`,
    `last` or `both` checkpoints, with the model on `device`; PNGs and a JSON note under <run>/samples/."""
    from vaeflow.data import PreparedDataset

    cfg = {**schema_defaults("sampling"), **(sampling_cfg or {})}
    check_square(samples)
    lo, hi = (float(v) for v in cfg["latent_range"])
    if not lo < hi:
        raise SampleError(f"sampling.latent_range must be [low, high] with low < high, got {cfg['latent_range']}")
    run_name = run_name or latest_run(checkpoints_root)
    layout = Layout(checkpoints_root)
    stage_dir = layout.stage(run_name)
    run_dir = stage_dir.dir
    if not run_dir.is_dir():
        raise SampleError(f"no run directory {run_dir}")
    labels = ["best", "last"] if checkpoint == "both" else [checkpoint]
    data_dir = Path(data_dir) if data_dir else layout.data
    ds = PreparedDataset(data_dir, "test", binarize="static" if _manifest_binarize(data_dir) == "dynamic" else None, seed=seed)
    if len(ds) == 0:
        raise SampleError(f"the test split under {data_dir} is empty")
    written = []
    for label in labels:
        ckpt_path = stage_dir.checkpoint(label)
        model, state = load_autoencoder(ckpt_path, device=device)
        x = _images(ds, samples)
        family = model_family(model, x)
        g = torch.Generator().manual_seed(seed)
        if cfg["latent_base"] == "encoded":
            base = _encode(model, x[:1])[0]
            base_desc = "the first test image's latent (encode_latent)"
        else:
            base = torch.zeros(model.latent_shape)
            base_desc = "zero (the prior mean)"
        tdims = cfg["traversal_dims"]
        if isinstance(tdims, int):
            tdims = most_informative_dims(model, _images(ds, min(len(ds), 256)), tdims)
        pairs = cfg["interpolation_pairs"]
        grids = {
            "reconstruction": reconstruction_grid(model, x),
            "random": random_samples(model, samples, g, family),
            "latent_grid": latent_grid(model, base, cfg["latent_dims"], (lo, hi), cfg["grid_size"]),
            "traversal": traversal(model, base, tdims, (lo, hi), cfg["traversal_steps"]),
            "interpolation": interpolation(model, _images(ds, pairs, 0), _images(ds, pairs, pairs), cfg["interpolation_steps"]),
        }
        for key in ("latent_grid", "traversal"):
            grids[key].description += f" at {base_desc}"
        note = {"run": run_name, "checkpoint": str(ckpt_path), "stage": state.get("stage"), "model_family": family,
                "latent_shape": list(model.latent_shape), "seed": seed, "files": {}}
        for key, grid in grids.items():
            path = save_grid(grid, stage_dir.sample_file(key, label), f"{run_name} {key} ({label})")
            note["files"][path.name] = {"strategy": key, "tiles": int(grid.tiles.shape[0]), "per_row": grid.nrow,
                                        "description": grid.description}
            written.append(path)
            if log:
                log(f"{path}: {grid.description}")
        note["prior"] = grids["random"].description
        note_path = stage_dir.sample_note(label)
        atomic_write(note_path, lambda f, note=note: f.write((json.dumps(note, indent=2) + "\n").encode()))
        written.append(note_path)
    return written


def _manifest_binarize(data_dir: Path) -> str:
    try:
        return json.loads((Path(data_dir) / MANIFEST).read_text()).get("binarize", "none")
    except (OSError, ValueError):
        return "none"
