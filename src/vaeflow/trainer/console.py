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

    def merge(self, other: Meter) -> None:
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += other.count

    def add_images(self, values: dict, n: int) -> None:
        """Add a batch's means as floats weighted by its n images (a mean over images)."""
        self.count += n
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n

    def means(self) -> dict:
        return {k: float(v) / max(1, self.count) for k, v in self.sums.items()}


# How the log line shows a logged metric (metrics not listed here stay in metrics.jsonl only).
SHOWN = {"vae_loss": ("VAE", ".4f"), "kl_loss": ("KL", ".2f"), "vq_loss": ("VQ", ".4f"), "g_loss": ("G", ".3f"),
         "d_loss": ("D", ".3f"), "lpips_loss": ("LPIPS", ".4f")}


def train_line(where: str, values: dict, metrics: list[str], batch_time: float, imgs_per_s: float) -> str:
    """One training log line: position, the stage's logged losses (`config.logged_metrics`), speed.
    """
    # The GAN terms appear once they train (disc_start for D, gan_start for G).
    shown = [f"{SHOWN[m][0]}: {values.get(m, 0.0):{SHOWN[m][1]}}" for m in metrics
             if m in SHOWN and (m in values or m not in ("g_loss", "d_loss"))]
    if "adv_weight" in values:  # the adaptive GAN weight, clamped to max_adaptive_weight
        shown.append(f"w_adv: {values['adv_weight']:.3g}")
    return " | ".join([where, *shown, f"{batch_time:.2f}s/batch", f"{imgs_per_s:.0f} img/s"])
