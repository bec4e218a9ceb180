"""`resize_square` (NumPy, so that `prepare` imports no torch) against the resampling it
replaces: torch's `interpolate(mode="bilinear", antialias=True, align_corners=False)`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vaeflow.data.sources.base import resize_square


def torch_reference(x: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(x)
    h, w = t.shape[-2:]
    scale = size / min(h, w)
    nh, nw = (size, size) if h == w else (max(size, round(h * scale)), max(size, round(w * scale)))
    t = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return t[..., top:top + size, left:left + size].clamp(0, 1).numpy()


@pytest.mark.parametrize("shape, size", [
    ((5, 1, 8, 8), 16),      # digits, the default: upsampling x2
    ((3, 1, 8, 8), 28),      # non-integer upsampling
    ((2, 1, 28, 28), 16),    # MNIST down
    ((2, 3, 218, 178), 64),  # CelebA-like: non-square, antialiased downsampling, center crop
    ((1, 1, 512, 512), 128),  # CT slice
    ((2, 1, 7, 13), 5),      # odd sizes
])
def test_matches_torch_antialiased_bilinear(shape, size):
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    ours = resize_square(x, size)
    assert ours.dtype == np.float32 and ours.shape == (*shape[:2], size, size)
    np.testing.assert_allclose(ours, torch_reference(x, size), rtol=0, atol=2e-6)


def test_single_image_and_native_size():
    x = np.random.default_rng(1).random((1, 12, 12), dtype=np.float32)
    assert resize_square(x, 12) is x and resize_square(x, None) is x
    np.testing.assert_allclose(resize_square(x, 6), torch_reference(x[None], 6)[0], atol=2e-6)


def test_prepare_imports_no_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from vaeflow.data import prepare_dataset; "
            f"prepare_dataset({{'dataset': 'digits', 'image_size': 16, 'limit': 50}}, {str(tmp_path)!r}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
