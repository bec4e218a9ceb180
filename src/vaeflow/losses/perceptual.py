"""LPIPS (v0.1) through torchmetrics, refusing to run on a random backbone.

torchmetrics ships LPIPS's linear heads (the same files as the `lpips` package); the
AlexNet/VGG/SqueezeNet backbone is torchvision's file in `$TORCH_HOME/hub/checkpoints/`.
vaeflow reads that file itself (`torch.load(weights_only=True)`) after checking its sha256
against the prefix torchvision puts in the file name, so nothing is ever downloaded and a
wrong file is refused. Without the file, a stage that asks for LPIPS fails before training
starts and says where the file goes. `VAEFLOW_LPIPS_RANDOM_BACKBONE=1` (tests only) builds
a random backbone instead, loudly.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MIN_SIZE = 64
RANDOM_BACKBONE_ENV = "VAEFLOW_LPIPS_RANDOM_BACKBONE"

BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class PerceptualWeightsMissing(RuntimeError):
    pass


def random_backbone_opt_in() -> bool:
    """True when the test-only opt-in for a random LPIPS backbone is set."""
    return os.environ.get(RANDOM_BACKBONE_ENV) == "1"


def lpips_weights_path(net: str = "alex") -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def check_lpips_weights(net: str = "alex") -> Path:
    path = lpips_weights_path(net)
    if not path.is_file():
        raise PerceptualWeightsMissing(
            f"use_lpips needs the {net} backbone weights at {path} (torchvision's cache, "
            f"$TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}); copy "
            f"{BACKBONE_FILES[net]} there or run once with internet access. "
            "vaeflow never trains with a random LPIPS backbone."
        )
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_lpips_weights(net: str = "alex") -> tuple[Path, str]:
    """(path, sha256) of the backbone file after checking the sha256 prefix that torchvision
    puts in its file names (`alexnet-owt-<sha256[:8]>.pth`)."""
    path = check_lpips_weights(net)
    digest = sha256_file(path)
    want = re.search(r"-([0-9a-f]{8,})\.pth$", path.name).group(1)
    if not digest.startswith(want):
        raise PerceptualWeightsMissing(
            f"{path}: sha256 {digest[:12]}… does not start with {want} (the hash in torchvision's "
            f"file name): not torchvision's {net} weights; replace the file")
    return path, digest


def torchvision_key(key: str) -> str:
    """An LPIPS backbone key (`slice2.3.weight`, or `slices.1.3.squeeze.weight` for
    SqueezeNet) -> torchvision's (`features.3.weight`): the slices keep the layer indices."""
    parts = key.split(".")
    return "features." + ".".join(parts[2:] if parts[0] == "slices" else parts[1:])


def load_backbone_file(lpips_module: nn.Module, path: str | Path) -> None:
    """Load a torchvision backbone file into a torchmetrics LPIPS module's `net` (whose slices
    hold torchvision's `features[i]` layers under their original indices)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapped = {}
    for key in lpips_module.net.state_dict():
        if torchvision_key(key) not in state:
            raise PerceptualWeightsMissing(f"{path}: no {torchvision_key(key)} in the file: not a torchvision backbone")
        mapped[key] = state[torchvision_key(key)]
    lpips_module.net.load_state_dict(mapped, strict=True)


def load_backbone(lpips_module: nn.Module, net: str) -> tuple[Path, str]:
    """Verify torchvision's `net` file and load it; returns (path, sha256)."""
    path, digest = verify_lpips_weights(net)
    load_backbone_file(lpips_module, path)
    return path, digest


def lpips_inputs(recon: torch.Tensor, target: torch.Tensor, input_range: str = "signed") -> tuple[torch.Tensor, torch.Tensor]:
    """What the LPIPS network sees, for training and evaluation alike: fp32 in [-1, 1]
    (`input_range` "unit": the pair is in [0, 1] and mapped first), 3 channels (grayscale
    repeated), every side >= MIN_SIZE (bilinear upsampling: the backbones' pooling needs
    64 px; digits are 8-32), volumes as their depth slices ([B*D, C, H, W])."""
    recon, target = recon.float(), target.float()
    if input_range == "unit":
        recon, target = recon * 2 - 1, target * 2 - 1
    elif input_range != "signed":
        raise ValueError(f"input_range must be signed or unit, got {input_range!r}")
    if recon.dim() == 5:  # volumes: score every slice along depth
        recon = recon.transpose(1, 2).flatten(0, 1)
        target = target.transpose(1, 2).flatten(0, 1)
    if recon.shape[1] == 1:
        recon, target = recon.repeat(1, 3, 1, 1), target.repeat(1, 3, 1, 1)
    if min(recon.shape[-2:]) < MIN_SIZE:
        size = [max(MIN_SIZE, s) for s in recon.shape[-2:]]
        recon = F.interpolate(recon, size=size, mode="bilinear", align_corners=False)
        target = F.interpolate(target, size=size, mode="bilinear", align_corners=False)
    return recon, target


class PerceptualLoss(nn.Module):
    """Mean LPIPS distance of a pair in the model's range (`input_range`: "signed" [-1, 1],
    "unit" [0, 1]), prepared by `lpips_inputs` as evaluation prepares it.

    `backbone` records where the backbone came from: {"file", "sha256"} or "random"."""

    def __init__(self, net: str = "alex", pretrained_backbone: bool = True, input_range: str = "signed"):
        super().__init__()
        if pretrained_backbone:
            check_lpips_weights(net)
        # imported here: only stages that use LPIPS pay for it. torchmetrics' LPIPS module is
        # private API (pinned in pyproject); its public metric would download a missing backbone.
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        self.input_range = input_range
        self.lpips = _NoTrainLpips(net=net, pnet_rand=True)  # random backbone first: never a download
        self.backbone: dict | str = "random"
        if pretrained_backbone:
            path, digest = load_backbone(self.lpips, net)
            self.backbone = {"file": str(path), "sha256": digest}
        self.lpips.eval().requires_grad_(False)

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """fp32 whatever the autocast state: LPIPS normalizes features channel-wise and sums
        small squared differences, which fp16/bf16 round away."""
        with torch.autocast(device_type=recon.device.type, enabled=False):
            return self.lpips(*lpips_inputs(recon, target, self.input_range)).mean()
