import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _quiet_scratch_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*starts from scratch.*")
        yield


@pytest.fixture
def grads_missing():
    """loss -> names of trainable parameters that got no (finite) gradient."""
    return _grads_missing


def _grads_missing(model, loss):
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and
               (p.grad is None or not torch.isfinite(p.grad).all())]
    return missing
