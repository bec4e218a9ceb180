"""``celeba``: aligned CelebA faces (center crop, then resize).

Images come from ``data.root/img_align_celeba/`` when that folder exists,
otherwise from ``data.root`` itself (recursive). Transform: CenterCrop(178),
then resize to ``data.image_size`` (bilinear, antialiased), RGB by default.
"""

from __future__ import annotations

import numpy as np

from .base import center_crop, resize_square
from .image_dir import ImageDirSource

CROP = 178


class CelebASource(ImageDirSource):
    name = "celeba"
    default_channels = 3

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        sub = self.root / "img_align_celeba"
        if sub.is_dir():
            self.root = sub

    def transform(self, x: np.ndarray) -> np.ndarray:
        return resize_square(center_crop(x, CROP), self.image_size)
