"""What a stage prints: timestamped log lines (plus a tqdm bar on a terminal), and the
running means those lines report."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import datetime

import torch


class Console:
    """Timestamped log lines, plus a tqdm bar when stderr is a terminal."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stdout
        self.bar = None
        self.enabled = enabled  # off on ranks other than 0

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        msg = f"[{datetime.now():%H:%M:%S}] {text}"
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, file=self.stream, flush=True)

    def start_bar(self, total: int, initial: int, desc: str) -> None:
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class Meter:
    sums: dict = field(default_factory=dict)
    count: int = 0

    def add(self, values: dict) -> None:
        """Values may be 0-d tensors: they stay on the device until `means()`, so the
        training loop does not wait for the GPU after every batch."""
        self.count += 1
        for k, v in values.items():
            v = v.detach() if torch.is_tensor(v) else v
            self.sums[k] = self.sums.get(k, 0.0) + v

    def add_images(self, values: dict, n: int) -> None:
        """Add a batch's means as floats weighted by its n images (a mean over images)."""
        self.count += n
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n

    def means(self) -> dict:
        return {k: float(v) / max(1, self.count) for k, v in self.sums.items()}


def train_line(stage: str, index: int, n_stages: int, epoch: int, max_epochs: int, batch: int, n_batches: int,
               values: dict, step: dict, batch_time: float, imgs_per_s: float) -> str:
    """One training log line: the losses this stage trains, then speed."""
    parts = [
        f"Step {stage} ({index + 1}/{n_stages})",
        f"Epoch {epoch + 1}/{max_epochs}",
        f"Batch {batch}/{n_batches}",
        f"VAE: {values.get('vae_loss', 0.0):.4f}",
    ]
    if "kl_loss" in values:
        parts.append(f"KL: {values['kl_loss']:.2f}")
    if "vq_loss" in values:
        parts.append(f"VQ: {values['vq_loss']:.4f}")
    if step["gan_training"]:
        parts += [f"G: {values.get('g_loss', 0.0):.3f}", f"D: {values.get('d_loss', 0.0):.3f}"]
    if step["use_lpips"]:
        parts.append(f"LPIPS: {values.get('lpips_loss', 0.0):.4f}")
    parts += [f"{batch_time:.2f}s/batch", f"{imgs_per_s:.0f} img/s"]
    return " | ".join(parts)
