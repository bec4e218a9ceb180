"""Image grids as PNG: torchvision's `make_grid` / `save_image` layout, without importing
torchvision (which costs a sampling job about as much start-up time as torch itself).

Same output as `torchvision.utils.make_grid(tiles, nrow, padding, pad_value)` with
normalize=False (tested against it): one-channel tiles become three-channel, each tile sits in
a `padding`-wide frame of `pad_value`, rows of `nrow` tiles.
"""

from __future__ import annotations

import math

import torch


def make_grid(tiles: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """[B, C, H, W] (or [C, H, W]) tiles -> one [C', H', W'] image (C' = 3 for one-channel tiles)."""
    if tiles.dim() == 3:
        tiles = tiles.unsqueeze(0)
    if tiles.size(1) == 1:
        tiles = torch.cat((tiles, tiles, tiles), 1)
    if tiles.size(0) == 1:
        return tiles.squeeze(0)
    n = tiles.size(0)
    xmaps = min(nrow, n)
    ymaps = math.ceil(n / xmaps)
    height, width = tiles.size(2) + padding, tiles.size(3) + padding
    grid = tiles.new_full((tiles.size(1), height * ymaps + padding, width * xmaps + padding), pad_value)
    for k in range(n):
        y, x = divmod(k, xmaps)
        grid.narrow(1, y * height + padding, height - padding).narrow(2, x * width + padding, width - padding).copy_(tiles[k])
    return grid


def to_uint8(image: torch.Tensor):
    """[C, H, W] in [0, 1] -> [H, W, C] uint8 numpy array (rounded as torchvision's save_image)."""
    return image.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()


def save_image(tiles: torch.Tensor, fp, nrow: int = 8, padding: int = 2, pnginfo=None) -> None:
    """Write the grid of `tiles` as a PNG to a path or binary file object."""
    from PIL import Image

    Image.fromarray(to_uint8(make_grid(tiles, nrow=nrow, padding=padding))).save(fp, format="png", pnginfo=pnginfo)
