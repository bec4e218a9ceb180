"""Does LPIPS through torchmetrics (what vaeflow uses) give the `lpips` package's numbers?

The two share the LPIPS v0.1 linear heads (byte-identical .pth files; this script compares
their sha256) and torchvision's backbone. With no pretrained backbone on this machine, both
get the SAME random backbone (copied from one into the other) and are compared on random
image pairs: what differs is only the code (normalisation epsilon, layer slicing).

    python benchmarks/lpips_equivalence.py [--pairs 64] [--size 64]

Needs the `lpips` package (`pip install lpips`; vaeflow itself no longer depends on it).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
from pathlib import Path

import torch
from importlib.metadata import version


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()

    import lpips
    import torchmetrics
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    from vaeflow.losses.perceptual import torchvision_key

    torch.manual_seed(0)
    for net in ("alex", "vgg", "squeeze"):
        ours = _NoTrainLpips(net=net, pnet_rand=True).eval()
        theirs = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
        tv = {torchvision_key(k): v for k, v in ours.net.state_dict().items()}  # one random backbone for both
        theirs.net.load_state_dict({k: tv[torchvision_key(k)] for k in theirs.net.state_dict()})
        heads_tm = Path(inspect.getfile(_NoTrainLpips)).parent / "lpips_models" / f"{net}.pth"
        heads_lp = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        a = torch.rand(args.pairs, 3, args.size, args.size) * 2 - 1
        b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
        with torch.no_grad():
            d_ours, d_theirs = ours(a, b).flatten(), theirs(a, b).flatten()
        diff = (d_ours - d_theirs).abs()
        print(f"{net:8s} heads identical: {_sha(heads_tm) == _sha(heads_lp)}; "
              f"LPIPS mean {float(d_theirs.mean()):.6f} (lpips {version('lpips')}) vs "
              f"{float(d_ours.mean()):.6f} (torchmetrics {torchmetrics.__version__}); "
              f"max |diff| {float(diff.max()):.2e}, max rel {float((diff / d_theirs.abs()).max()):.2e} "
              f"over {args.pairs} pairs of {args.size}x{args.size}")


if __name__ == "__main__":
    main()
