"""vaeflow.train on any torch Dataset (the library API)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

import vaeflow
from support import TINY


def test_train_on_a_tensor_dataset_with_labels_and_other_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(80, 1, 12, 12, generator=g)  # resized to data.image_size (8)
    ds = TensorDataset(images, torch.zeros(80))
    summaries = vaeflow.train(ds, TINY, ds, results_dir=tmp_path)
    assert [s["stage"] for s in summaries] == ["vae_warmup", "vae_gan"]
    for stage in ("vae_warmup", "vae_gan"):
        state = torch.load(tmp_path / stage / "best.pt", weights_only=True)
        assert state["stage"] == stage and state["pipeline_metadata"]["current_step_name"] == stage
    assert summaries[1]["global_step"] == 2 * 2  # 80 // 32 = 2 batches x 2 epochs
