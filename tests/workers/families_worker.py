"""Every model family, warm-up then GAN stage, in one process group (tests/test_distributed_families.py).

families_worker.py OUT DATA_DIR [--probe]: under torchrun, trains each family's stages with
run_stage into OUT/<family>/ (the prepared data linked in); with --probe, through the
recording probe (workers/dist_probe.py), which writes OUT/probe/rank<R>.json.
In-process (no torchrun) it is the 1-process reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
BACKBONE = dict(in_channels=1, resolution=8, base_ch=8, ch_mult=[1, 2], num_res_blocks=1, norm_groups=4)
FAMILIES = {
    "kl": dict(type="autoencoder_kl", embed_dim=2, z_channels=2, attn_resolutions=[], **BACKBONE),
    "vqvae": dict(type="vqvae", codebook_size=32, embed_dim=4, **BACKBONE),
    "magvit_lfq": dict(type="magvit", quantizer="lfq", codebook_size=16, **BACKBONE),
    "magvit_fsq": dict(type="magvit", quantizer="fsq", levels=[5, 5, 3], **BACKBONE),
    "cnn_vae_bn": dict(type="cnn_vae", preset="mnist", image_size=8, hidden_dims=[8, 16], latent_dim=6),
}


def family_config(family: str, nproc: int) -> dict:
    from vaeflow import config as cfg
    from vaeflow.preflight import check_code_level

    raw = yaml.safe_load(TINY.read_text())
    raw["model"] = FAMILIES[family]
    t = raw["training"]
    t["batch_size"] = 16
    t["log_every"] = 1
    t["save_every"] = 100  # resume checkpoints at epoch ends only
    t["distributed"] = {"nproc_per_node": nproc, "backend": "gloo", "timeout_s": 60}
    t["pipeline"]["defaults"]["max_steps"] = 3
    gan = t["pipeline"]["steps"][1]
    if family.startswith("cnn"):
        t["pipeline"]["defaults"]["recon_type"] = "bce"
        raw["discriminator"]["norm"] = "batch"  # BatchNorm on both sides: buffers follow rank 0
    else:
        gan["r1_gamma"] = 1.0  # R1's double backward next to the overlapped all-reduce
    config = cfg.validate(raw)
    check_code_level(config)
    return config


def train_all(out: Path, data_dir: Path, nproc: int) -> None:
    from vaeflow import config as cfg
    from vaeflow.trainer import run_stage

    for family in FAMILIES:
        root = out / family
        root.mkdir(parents=True, exist_ok=True)
        try:
            (root / "data").symlink_to(data_dir.resolve())
        except FileExistsError:  # the other rank was first
            pass
        config = family_config(family, nproc)
        for stage in cfg.stage_names(config):
            run_stage(config, stage, root)


def main(argv: list[str]) -> None:
    out, data_dir = Path(argv[0]), Path(argv[1])
    if "--probe" in argv:
        from dist_probe import install

        install(out / "probe")
    import torch.distributed as dist

    from vaeflow.trainer.distributed import init_from_env

    init_from_env({"backend": "gloo", "timeout_s": 60})  # one group for every stage
    train_all(out, data_dir, dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
