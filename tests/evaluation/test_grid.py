"""vaeflow.grid draws exactly what torchvision.utils.make_grid / save_image draw."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vaeflow import grid


@pytest.mark.parametrize("shape, nrow, padding", [((7, 1, 5, 6), 3, 2), ((9, 3, 4, 4), 8, 1), ((1, 1, 3, 3), 8, 2),
                                                  ((4, 3, 2, 5), 2, 0), ((3, 5), 8, 2)])
def test_make_grid_matches_torchvision(shape, nrow, padding):
    from torchvision.utils import make_grid

    tiles = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    if tiles.dim() == 2:
        tiles = tiles[None]
    assert torch.equal(grid.make_grid(tiles, nrow=nrow, padding=padding), make_grid(tiles, nrow=nrow, padding=padding))


def test_save_image_writes_the_same_pixels_as_torchvision():
    from torchvision.utils import save_image

    tiles = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ours, theirs = io.BytesIO(), io.BytesIO()
    grid.save_image(tiles, ours, nrow=5)
    save_image(tiles, theirs, nrow=5, format="png")
    a, b = (np.asarray(Image.open(io.BytesIO(f.getvalue()))) for f in (ours, theirs))
    assert a.shape == (42, 52, 3) and np.array_equal(a, b)
