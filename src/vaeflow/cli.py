"""The `vaeflow` command. Stage entry points (scripts/*.py) call into it.

Known errors (bad config, bad data, unreadable checkpoint, missing LPIPS weights)
print one line and exit 2; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _known_errors() -> tuple[type[BaseException], ...]:
    from vaeflow.checkpoint import CheckpointError
    from vaeflow.config import ConfigError
    from vaeflow.data import DataError
    from vaeflow.losses import PerceptualWeightsMissing
    from vaeflow.sample import SampleError

    return (ConfigError, DataError, CheckpointError, PerceptualWeightsMissing, SampleError, FileNotFoundError)


def _load_config(args, remembered: bool = False):
    """The validated config; `remembered`: skip the torch-importing code-level check when the
    same check passed before (vaeflow.precheck), for jobs that need no torch themselves."""
    from vaeflow import config as cfg

    config = cfg.load(args.config)
    if remembered:
        from vaeflow.precheck import check_code_level_cached

        check_code_level_cached(config)
    else:
        cfg.check_code_level(config)
    return config


def cmd_validate(args) -> int:
    from vaeflow.config import resolve_steps, stage_metrics

    config = _load_config(args)
    steps = resolve_steps(config)
    print("Pipeline validation passed!\n")
    print("Pipeline Summary:")
    print(f"  Total steps: {len(steps)}")
    print(f"  Total epochs: {sum(s['n_epochs'] for s in steps)}")
    print(f"  Model: {config['model']['type']}, data: {config['data']['dataset']} at {config['data']['image_size']}px")
    for i, s in enumerate(steps, 1):
        modes = [m for m, on in (("VAE", s["train_vae"]), ("GAN", s["gan_training"]), ("LPIPS", s["use_lpips"])) if on]
        print(f"\nStep {i}: {s['name']} ({s['n_epochs']} epochs)")
        print(f"  Training: {', '.join(modes)}")
        frozen = sorted(set(s["freeze"]) - set(s["unfreeze"]))
        if frozen:
            print(f"  Freeze: {', '.join(frozen)}")
        opt = s["optimization"]["optimizers"]["vae"]
        print(f"  Optimizer: {opt['type']} lr={opt.get('lr')}; recon={s['recon_type']}, kl_beta={s['kl_beta']}")
        t = s["transition_on"]
        if t.get("mode") == "loss_threshold":
            print(f"  Transition: loss_threshold ({t['metric']} < {t['threshold']}, max {t['max_epochs']} epochs)")
        print(f"  Metrics: {', '.join(sorted(stage_metrics(s)))}")
    return 0


def cmd_prepare(args) -> int:
    from vaeflow.data import prepare_dataset

    config = _load_config(args, remembered=True)  # after the Snakefile's check: no torch here
    manifest = prepare_dataset(config["data"], Path(args.results) / "data")
    counts = manifest.get("counts", {})
    print(f"prepared {config['data']['dataset']}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


def cmd_train(args) -> int:
    import os

    from vaeflow.trainer import run_stage

    config = _load_config(args)
    nproc = config["training"]["distributed"]["nproc_per_node"]
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        # Relaunch this very command under torchrun: one process per device.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "vaeflow.cli", "train", "--config", *args.config, "--results", args.results, "--stage", args.stage]
        sys.stdout.flush()
        os.execv(sys.executable, cmd)
    run_stage(config, args.stage, args.results)
    return 0


def cmd_evaluate(args) -> int:
    from vaeflow.config import stage_index
    from vaeflow.evaluate import evaluate_checkpoint, summary_line, write_metrics

    config = _load_config(args)
    stage_index(config, args.stage)
    from vaeflow.data import check_prepared

    check_prepared(config["data"], Path(args.results) / "data")
    ecfg = config["evaluation"]
    metrics = evaluate_checkpoint(
        Path(args.results) / args.stage / f"{ecfg['checkpoint']}.pt", Path(args.results) / "data",
        eval_cfg=ecfg, seed=config["seed"],
    )
    write_metrics(metrics, Path(args.results) / args.stage / "eval" / "metrics.json")
    lp = metrics["lpips"]
    if not lp.get("available"):
        print(f"LPIPS unavailable (recorded as such): {lp.get('reason')}")
    print(summary_line(args.stage, metrics))
    return 0


def cmd_sample(args) -> int:
    from vaeflow.sample import SAMPLING_DEFAULTS, check_square, sample_run

    if args.samples is not None:
        check_square(args.samples)  # before loading anything
    if args.config:
        config = _load_config(args)
        scfg, seed = config["sampling"], config["seed"]
    else:
        scfg, seed = dict(SAMPLING_DEFAULTS), 0
    samples = args.samples or scfg["samples"]
    checkpoint = args.checkpoint or scfg["checkpoint"]
    run = args.run_name
    if run is None:
        from vaeflow.sample import latest_run

        run = latest_run(args.checkpoints_root)
        print(f"--run-name not given: using the most recently updated run, {run}")
    sample_run(args.checkpoints_root, run, checkpoint, samples, data_dir=args.data_dir, seed=seed,
               sampling_cfg=scfg, log=print)
    return 0


def cmd_curves(args) -> int:
    from vaeflow.report import stage_curves

    for path in stage_curves(args.results, args.stage):
        print(path)
    return 0


def cmd_summary(args) -> int:
    from vaeflow.config import load, stage_names
    from vaeflow.report import iter_stage_metrics, write_summary

    config = load(args.config)  # no code-level check: this job reads JSON, it needs no torch
    stages = stage_names(config)
    metrics = iter_stage_metrics(args.results, stages)
    missing = [s for s in stages if s not in metrics]
    if missing:
        raise FileNotFoundError(f"no eval/metrics.json for stage(s) {', '.join(missing)} under {args.results}: run evaluate first")
    root = Path(args.results)
    df = write_summary(metrics, root / "summary.csv", root / "summary.md", root / "summary.html")
    print(df.to_string(index=False))
    return 0


def cmd_dvc_yaml(args) -> int:
    from vaeflow.config import load
    from vaeflow.dvcgen import render_dvc_yaml

    config = load(args.config)  # schema + semantics; the stages themselves run the code-level check
    text = render_dvc_yaml(config, args.config)
    out = Path(args.out)
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is stale: regenerate it with `vaeflow dvc-yaml --config {' '.join(args.config)}`", file=sys.stderr)
            return 1
        print(f"{out} is current")
        return 0
    from vaeflow.checkpoint import atomic_write

    atomic_write(out, lambda f: f.write(text.encode()))
    print(f"wrote {out}")
    return 0


def cmd_sync_mtimes(args) -> int:
    from vaeflow.dvcsync import sync_mtimes

    touched = sync_mtimes(Path(args.root))
    print(f"restored DAG order of modification times for {len(touched)} DVC-restored file(s)")
    return 0


def cmd_export_diffusers(args) -> int:
    from vaeflow.interop.diffusers import export_diffusers

    export_diffusers(args.checkpoint, args.out_dir)
    print(f"wrote {args.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vaeflow", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, required=True):
        sp.add_argument("--config", nargs="+", default=None if not required else ["config/config.yaml"],
                        help="config file(s); later files override earlier ones (default: config/config.yaml)")
        sp.add_argument("--results", default="results", help="results directory (default: results)")
        return sp

    sp = sub.add_parser("validate", help="check a config and print the pipeline summary (seed 003's --validate-pipeline)")
    sp.add_argument("config", nargs="+")
    sp.set_defaults(func=cmd_validate)
    with_config(sub.add_parser("prepare", help="raw data -> results/data")).set_defaults(func=cmd_prepare)
    sp = with_config(sub.add_parser("train", help="train one stage"))
    sp.add_argument("--stage", required=True)
    sp.set_defaults(func=cmd_train)
    sp = with_config(sub.add_parser("evaluate", help="test-split metrics of one stage"))
    sp.add_argument("--stage", required=True)
    sp.set_defaults(func=cmd_evaluate)
    sp = sub.add_parser("sample", help="sample grids from a trained stage (seed 000's flags)")
    sp.add_argument("--config", nargs="+", default=None)
    sp.add_argument("--checkpoints-root", default="results")
    sp.add_argument("--run-name", default=None, help="stage directory (default: most recently updated)")
    sp.add_argument("--checkpoint", choices=["best", "last", "both"], default=None)
    sp.add_argument("--samples", type=int, default=None, help="grid size, a perfect square")
    sp.add_argument("--data-dir", default=None, help="prepared data (default: <checkpoints-root>/data)")
    sp.set_defaults(func=cmd_sample)
    sp = with_config(sub.add_parser("curves", help="loss-curve PNG and CSVs of one stage from its metrics.jsonl"))
    sp.add_argument("--stage", required=True)
    sp.set_defaults(func=cmd_curves)
    with_config(sub.add_parser("summary", help="results/summary.csv|md|html across stages")).set_defaults(func=cmd_summary)
    sp = with_config(sub.add_parser("dvc-yaml", help="write dvc.yaml from the config"))
    sp.add_argument("--out", default="dvc.yaml")
    sp.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    sp.set_defaults(func=cmd_dvc_yaml)
    sp = sub.add_parser("sync-mtimes", help="after dvc pull/checkout: restore DAG-ordered mtimes so Snakemake sees outputs as current")
    sp.add_argument("--root", default=".")
    sp.set_defaults(func=cmd_sync_mtimes)
    sp = sub.add_parser("export-diffusers", help="write a checkpoint as a diffusers AutoencoderKL folder")
    sp.add_argument("checkpoint")
    sp.add_argument("out_dir")
    sp.set_defaults(func=cmd_export_diffusers)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _known_errors() as exc:
        print(f"vaeflow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
