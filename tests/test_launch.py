"""The torchrun command line `vaeflow train` runs (the interface the SLURM rule relies on)."""

from __future__ import annotations

import pytest
from torch.distributed.run import parse_args

from vaeflow.config import ConfigError
from vaeflow.trainer.launch import torchrun_args


def test_one_node_is_standalone():
    assert torchrun_args(2, 1, None, None, 600) == ["--standalone", "--nproc-per-node=2"]


def test_several_nodes_use_c10d_rendezvous_and_torchrun_accepts_it():
    opts = torchrun_args(4, 2, "node1:29400", "job42", 300)
    assert opts == ["--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=node1:29400",
                    "--rdzv-id=job42", "--rdzv-conf=join_timeout=300"]
    args = parse_args([*opts, "-m", "vaeflow.cli", "train"])  # torchrun's own parser
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == (
        "2", "4", "c10d", "node1:29400", "job42")


def test_several_nodes_without_endpoint_is_a_config_error():
    with pytest.raises(ConfigError, match="training.distributed.nnodes: 3 nodes need a rendezvous endpoint"):
        torchrun_args(1, 3, None, None, 600, "config/config.yaml")
