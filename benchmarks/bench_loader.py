"""Prepared-loader throughput vs torchvision ImageFolder + DataLoader on the same images.

Makes ``--n`` random-content RGB images with PIL in a temp dir (ImageFolder
layout: ``root/class_k/*.png``), prepares them once with
``vaeflow.data.prepare_dataset`` (``image_dir``), then times full epochs of

  * ImageFolder(root, ToTensor()) + DataLoader  (decodes every image every epoch)
  * PreparedDataset(prepared, "train") + DataLoader  (memory-mapped uint8)

with the same batch size, workers and shuffling, and prints images/s and the ratio.

    PYTHONPATH=src python benchmarks/bench_loader.py --n 4000 --size 64 --workers 0
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vaeflow.data import PreparedDataset, prepare_dataset


def make_images(root: Path, n: int, size: int, fmt: str, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    # smooth-ish content (upsampled noise) so PNG/JPEG sizes are realistic, not worst-case noise
    for i in range(n):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        img.save(folder / f"{i:06d}.{fmt}", **({"quality": 90} if fmt == "jpg" else {}))


def time_epochs(dataset, args, collate=None) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, collate_fn=collate,
                                         persistent_workers=args.workers > 0)
    for _ in loader:  # warm-up epoch (page cache, worker start)
        break
    seen = 0
    start = time.perf_counter()
    for _ in range(args.epochs):
        for batch in loader:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            seen += x.shape[0]
    return seen / (time.perf_counter() - start)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000, help="number of images")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--format", choices=["png", "jpg"], default="png")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args(argv)

    from torchvision import datasets, transforms

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="vaeflow-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_images(tmp / "raw", args.n, args.size, args.format)
        t1 = time.perf_counter()
        prepare_dataset({"dataset": "image_dir", "root": str(tmp / "raw"), "image_size": args.size,
                         "channels": 3, "split": {"val": 0.0, "test": 0.0}}, tmp / "prepared")
        t2 = time.perf_counter()
        folder = datasets.ImageFolder(str(tmp / "raw"), transform=transforms.ToTensor())
        prepared = PreparedDataset(tmp / "prepared", "train")
        assert len(folder) == len(prepared) == args.n
        ips_folder = time_epochs(folder, args)
        ips_prepared = time_epochs(prepared, args)
    result = {"n": args.n, "size": args.size, "format": args.format, "batch_size": args.batch_size,
              "workers": args.workers, "epochs": args.epochs, "make_s": round(t1 - t0, 2),
              "prepare_s": round(t2 - t1, 2), "imagefolder_ips": round(ips_folder, 1),
              "prepared_ips": round(ips_prepared, 1), "ratio": round(ips_prepared / ips_folder, 2)}
    print(f"images: {args.n} x {args.size}x{args.size} RGB {args.format}; batch {args.batch_size}, "
          f"workers {args.workers}, {args.epochs} timed epochs")
    print(f"prepare (one-off): {result['prepare_s']:.2f} s")
    print(f"ImageFolder + DataLoader:     {ips_folder:10.1f} images/s")
    print(f"PreparedDataset + DataLoader: {ips_prepared:10.1f} images/s")
    print(f"ratio (prepared / ImageFolder): {result['ratio']:.2f}x")
    return result


if __name__ == "__main__":
    main()
