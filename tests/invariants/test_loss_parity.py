"""A loss term scores the same pair identically in training and in evaluation: LPIPS, whose
input preparation (`losses.perceptual.lpips_inputs`) both use, for signed ([-1, 1]) and
unit-range ([0, 1], BCE) models, images of every size and volumes."""

from __future__ import annotations

import pytest
import torch

from vaeflow.eval.perceptual import lpips_per_image
from vaeflow.losses.perceptual import PerceptualLoss
from vaeflow.metrics import to_model_range


class _Range(torch.nn.Module):
    def __init__(self, input_range: str):
        super().__init__()
        self.input_range = input_range


@pytest.mark.parametrize("input_range", ["signed", "unit"])
@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (2, 3, 32, 32), (2, 1, 64, 48), (2, 1, 4, 16, 16)])
def test_lpips_training_equals_evaluation(input_range, shape):
    torch.manual_seed(0)
    x, rec = torch.rand(shape), torch.rand(shape)  # [0, 1], as evaluation sees them
    loss = PerceptualLoss("alex", pretrained_backbone=False, input_range=input_range)  # random backbone: tests only
    model = _Range(input_range)
    trained = loss(to_model_range(rec, model), to_model_range(x, model))  # what the trainer passes
    evaluated = lpips_per_image(loss.lpips)(rec, x).mean()
    assert float(trained) == pytest.approx(float(evaluated), rel=1e-6, abs=1e-9)
    assert float(trained) > 0
