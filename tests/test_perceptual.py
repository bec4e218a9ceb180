"""LPIPS through torchmetrics: the backbone comes only from torchvision's file (sha256-checked),
never from a download, and a random backbone only behind the test opt-in."""

from __future__ import annotations

import pytest
import torch

from vaeflow.losses import perceptual as P


@pytest.fixture()
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(P.RANDOM_BACKBONE_ENV, raising=False)
    return tmp_path / "torch-home"


def test_missing_backbone_names_the_file(torch_home):
    with pytest.raises(P.PerceptualWeightsMissing, match="alexnet-owt-7be5be79.pth") as exc:
        P.PerceptualLoss("alex")
    assert str(torch_home) in str(exc.value)


def test_a_file_that_is_not_torchvisions_is_refused(torch_home):
    """Any other file saved under torchvision's name fails the sha256 prefix in the name."""
    path = P.lpips_weights_path("alex")
    path.parent.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, path)
    with pytest.raises(P.PerceptualWeightsMissing, match="does not start with 7be5be79"):
        P.PerceptualLoss("alex")


@pytest.mark.parametrize("net, tv_name", [("alex", "alexnet"), ("squeeze", "squeezenet1_1")])
def test_backbone_file_lands_in_the_lpips_layers(net, tv_name, tmp_path):
    """torchvision's `features.i` tensors end up in torchmetrics' LPIPS slices, all of them."""
    torch.manual_seed(0)
    import torchvision  # here, not at collection: with torch._dynamo, 0.5 s per pytest-xdist worker

    tv = {k: v for k, v in getattr(torchvision.models, tv_name)(weights=None).state_dict().items()
          if k.startswith("features.")}  # the classifier is not part of LPIPS
    path = tmp_path / "backbone.pth"
    torch.save(tv, path)
    loss = P.PerceptualLoss(net, pretrained_backbone=False)
    P.load_backbone_file(loss.lpips, path)
    got = loss.lpips.net.state_dict()
    assert got and all(torch.equal(v, tv[P.torchvision_key(k)]) for k, v in got.items())


def test_wrong_layout_is_refused(tmp_path):
    path = tmp_path / "backbone.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(P.PerceptualWeightsMissing, match="features.0.weight"):
        P.load_backbone_file(P.PerceptualLoss("alex", pretrained_backbone=False).lpips, path)


def test_random_backbone_loss_is_differentiable_and_zero_on_equal_images():
    loss = P.PerceptualLoss("alex", pretrained_backbone=False)
    assert loss.backbone == "random"
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    d = loss(y, x)
    d.backward()
    assert d > 0 and y.grad is not None and y.grad.abs().sum() > 0
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert not any(p.requires_grad for p in loss.parameters())
