"""The `vaeflow` command. Stage entry points (scripts/*.py) call into it through `run`.

DESCRIPTION and EPILOG are what `vaeflow --help` shows a user.

Known errors (bad config, bad data, unreadable checkpoint, missing LPIPS weights)
print one line and exit 2; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from vaeflow import __version__
from vaeflow.layout import DATA, EVAL_METRICS, RESULTS, SUMMARY_FILES, Layout

DESCRIPTION = """\
vaeflow trains image autoencoders (SD-style KL autoencoders, VQ tokenizers,
beta-VAEs) in stages from one YAML config: prepare your images once, train a
reconstruction warm-up, then a GAN stage (and more), evaluate on the test
split, draw sample grids, export to diffusers. Snakemake (`snakemake --cores 8`)
and DVC (`dvc repro`) run the whole pipeline through these same commands; call
one directly to run or check a single step."""

EPILOG = """\
examples:
  snakemake --cores 8                                  # the whole default pipeline
  vaeflow validate --config config/image_dir.yaml      # check a config, list its stages
  vaeflow prepare --config config/image_dir.yaml       # your images -> results/data
  vaeflow train --config config/config.yaml --stage vae_warmup
  vaeflow evaluate --config config/config.yaml --stage vae_gan
  vaeflow sample --stage vae_gan --samples 16
  vaeflow export results/vae_gan/best.pt exported/vae_gan   # diffusers folder, fitted latent scale, model card
  vaeflow provenance results/vae_gan/best.pt

docs: README.md, docs/*.md (data, evaluation, slurm)"""


class StageArgError(ValueError):
    """--stage names no stage of the config."""


def _check_stage(config: dict, args) -> None:
    """--stage must be one of the config's stages; the message lists them."""
    from vaeflow.config import stage_names

    names = stage_names(config)
    if args.stage not in names:
        raise StageArgError(f"--stage {args.stage!r} is not a stage of {' '.join(args.config)}; "
                            f"its stages: {', '.join(names)}")


# The errors a command reports in one line (exit 2) instead of a traceback, by module.
_ONE_LINE_ERRORS = {
    "vaeflow.config": "ConfigError",
    "vaeflow.data.errors": "DataError",
    "vaeflow.checkpoint": "CheckpointError",
    "vaeflow.losses.perceptual": "PerceptualWeightsMissing",
    "vaeflow.sample": "SampleError",
    "vaeflow.provenance": "ProvenanceError",
    "vaeflow.trainer.guard": "NonFiniteError",
    "vaeflow.collectives": "CollectiveError",
    "vaeflow.trainer.slurm": "LaunchError",
    "vaeflow.compare": "CompareError",
    "vaeflow.interop.export": "ExportError",
}


def _known_errors() -> tuple[type[BaseException], ...]:
    """The one-line errors of the modules this command imported. An error of a module never
    imported cannot have been raised, and importing three of them (torch) just to catch it
    would add 2 s to every refused command that needs no torch."""
    loaded = [getattr(sys.modules[m], name) for m, name in _ONE_LINE_ERRORS.items() if m in sys.modules]
    return (*loaded, StageArgError, FileNotFoundError)


def _load_config(args):
    """The validated config, with the checks that need the model code (vaeflow.preflight)."""
    from vaeflow import config as cfg
    from vaeflow.preflight import check_code_level

    cfg.check_unread_params(args.config)
    config = cfg.load(args.config)
    check_code_level(config)
    return config


def cmd_validate(args) -> int:
    from vaeflow.config import logged_metrics, model_family, resolve_steps

    # `validate CONFIG...` (positional) and `validate --config CONFIG...` are the same
    args.config = [*args.config_files, *(args.config or [])] or ["config/config.yaml"]
    config = _load_config(args)
    steps = resolve_steps(config)
    print("Pipeline validation passed!\n")
    print("Pipeline Summary:")
    print(f"  Total steps: {len(steps)}")
    print(f"  Total epochs: {sum(s['n_epochs'] for s in steps)}")
    print(f"  Model: {config['model']['type']}, data: {config['data']['dataset']} at {config['data']['image_size']}px")
    from vaeflow.config import run_layout

    layout = run_layout(config)
    print(f"  Run: {config['run'] or 'default'} (outputs under {layout.run_dir}/, prepared data {layout.data}/)")
    for i, s in enumerate(steps, 1):
        modes = [m for m, on in (("VAE", s["train_vae"]), ("GAN", s["gan_training"]), ("LPIPS", s["use_lpips"])) if on]
        print(f"\nStep {i}: {s['name']} ({s['n_epochs']} epoch{'' if s['n_epochs'] == 1 else 's'})")
        print(f"  Training: {', '.join(modes)}")
        frozen = sorted(set(s["freeze"]) - set(s["unfreeze"]))
        if frozen:
            print(f"  Freeze: {', '.join(frozen)}")
        opt = s["optimization"]["optimizers"]["vae"]
        print(f"  Optimizer: {opt['type']} lr={opt.get('lr')}; recon={s['recon_type']}, kl_beta={s['kl_beta']}")
        t = s["transition_on"]
        if t.get("mode") == "loss_threshold":
            print(f"  Transition: loss_threshold ({t['metric']} < {t['threshold']}, max {t['max_epochs']} epochs)")
        logged = logged_metrics(s, model_family(config["model"]["type"]))
        print(f"  Metrics: {', '.join(logged['train'] + logged['val'])}")
    return 0


def cmd_prepare(args) -> int:
    from vaeflow import config as cfg
    from vaeflow.data import prepare_dataset

    # Schema checks only: prepare reads the data section, and the model-code checks
    # (vaeflow.preflight) would import torch, 2 s on the pipeline's critical path; every
    # later stage command runs them before it writes anything.
    cfg.check_unread_params(args.config)  # a value `dvc exp run -S` put in ./params.yaml
    if args.data is not None:  # named runs' shared copy: the data section alone decides it
        import json

        data = cfg.validate_section("data", json.loads(args.data), source="--data")
        out = Layout(args.results, data_key=cfg.data_key({"data": data})).data
    else:
        config = cfg.load(args.config)
        data, out = config["data"], cfg.run_layout(config, args.results).data
    manifest = prepare_dataset(data, out)
    counts = manifest.get("counts", {})
    print(f"prepared {data['dataset']} into {out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


def cmd_train(args) -> int:
    import os
    import shlex

    from vaeflow.trainer import run_stage

    config = _load_config(args)
    _check_stage(config, args)
    dcfg = config["training"]["distributed"]
    if dcfg["nproc_per_node"] * dcfg["nnodes"] > 1 and "WORLD_SIZE" not in os.environ:
        # Relaunch this very command under torchrun: one process per device (trainer/launch.py).
        from vaeflow.trainer.launch import ENDPOINT_ENV, launch

        worker = ["train", "--config", *args.config, "--results", args.results, "--stage", args.stage]
        if dcfg["nnodes"] > 1 and not (args.rdzv_endpoint or os.environ.get(ENDPOINT_ENV)):
            # A SLURM job's batch script: one `vaeflow train` per node through srun, each told the
            # rendezvous (trainer/slurm.py); outside SLURM, one message with the per-machine command.
            from vaeflow.trainer.slurm import multinode_command

            cmd = multinode_command(dcfg["nnodes"], dcfg["nproc_per_node"], ["-m", "vaeflow.cli", *worker])
            print("vaeflow: " + shlex.join(cmd), flush=True)
            os.execvp(cmd[0], cmd)
        return launch(worker, dcfg, args.rdzv_endpoint, args.rdzv_id, source=", ".join(args.config))
    import torch

    from vaeflow.config import stage_cpu_threads

    # The thread count changes float reduction order: the config fixes it, not the runner's env.
    threads = max(1, stage_cpu_threads(config, args.stage) // dcfg["nproc_per_node"])
    torch.set_num_threads(threads)
    print(f"Intra-op CPU threads: {threads} per process (stage {args.stage})", flush=True)
    run_stage(config, args.stage, args.results)
    return 0


def _eval_device(config: dict | None):
    """`evaluation.device`, or `training.device` when null ("auto": cuda, then mps, then cpu);
    evaluation and sampling run there."""
    from vaeflow.config import ConfigError
    from vaeflow.trainer.device import resolve_device

    name = "auto" if config is None else (config["evaluation"].get("device") or config["training"]["device"])
    try:
        return resolve_device(name)
    except RuntimeError:
        key = "evaluation.device" if config and config["evaluation"].get("device") else "training.device"
        raise ConfigError(key, f"{name!r} but CUDA is not available on this machine") from None


def cmd_evaluate(args) -> int:
    from vaeflow.config import run_layout, stage_index
    from vaeflow.evaluate import evaluate_checkpoint, summary_line, write_metrics

    config = _load_config(args)
    _check_stage(config, args)
    stage_index(config, args.stage)
    device = _eval_device(config)
    from vaeflow.data import check_prepared

    layout = run_layout(config, args.results)
    check_prepared(config["data"], layout.data)
    ecfg = config["evaluation"]
    stage = layout.stage(args.stage)
    metrics = evaluate_checkpoint(stage.checkpoint(ecfg["checkpoint"]), layout.data, eval_cfg=ecfg, seed=config["seed"], device=device)
    from vaeflow.provenance import record

    metrics["provenance"] = record()
    write_metrics(metrics, stage.eval_metrics)
    for key, name in (("lpips", "LPIPS"), ("rfid", "rFID")):
        if not metrics[key].get("available"):
            print(f"{name} unavailable (recorded as such): {metrics[key].get('reason')}")
    print(summary_line(args.stage, metrics))
    return 0


def cmd_sample(args) -> int:
    from vaeflow.config import run_layout, schema_defaults
    from vaeflow.sample import check_square, sample_run

    if args.samples is not None:
        check_square(args.samples)  # before loading anything
    if args.config:
        config = _load_config(args)
        if args.stage is not None:
            _check_stage(config, args)
        scfg, seed = config["sampling"], config["seed"]
        layout = run_layout(config, args.results)
    else:
        scfg, seed = schema_defaults("sampling"), schema_defaults("seed")
        layout = Layout(args.results, run=args.run)
    samples = args.samples or scfg["samples"]
    checkpoint = args.checkpoint or scfg["checkpoint"]
    stage = args.stage
    if stage is None:
        from vaeflow.sample import latest_run

        stage = latest_run(layout.run_dir)
        print(f"--stage not given: using the most recently updated stage, {stage}")
    sample_run(layout.run_dir, stage, checkpoint, samples, data_dir=args.data_dir or layout.data, seed=seed,
               sampling_cfg=scfg, log=print, device=_eval_device(config if args.config else None))
    return 0


def cmd_curves(args) -> int:
    from vaeflow.report import stage_curves

    for path in stage_curves(Layout(args.results, run=args.run).run_dir, args.stage):
        print(path)
    return 0


def cmd_summary(args) -> int:
    from vaeflow.config import check_unread_params, load, run_layout, stage_names
    from vaeflow.report import iter_stage_metrics, to_markdown, write_summary

    check_unread_params(args.config)
    config = load(args.config)  # no code-level check: this job reads JSON, it needs no torch
    stages = stage_names(config)
    layout = run_layout(config, args.results)
    metrics = iter_stage_metrics(layout.run_dir, stages)
    missing = [s for s in stages if s not in metrics]
    if missing:
        raise FileNotFoundError(f"no {EVAL_METRICS} for stage(s) {', '.join(missing)} under {layout.run_dir}: run evaluate first")
    print(to_markdown(write_summary(metrics, *layout.summary_files())), end="")
    return 0


def cmd_compare(args) -> int:
    from vaeflow.compare import compare_runs

    text, files = compare_runs(args.results, args.runs, name=args.name, by=args.by)
    print(text, end="")
    print("wrote " + ", ".join(str(p) for p in files.values()))
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


def cmd_export(args) -> int:
    from vaeflow.interop.export import export_checkpoint

    export_checkpoint(args.checkpoint, args.out_dir, fmt=args.format, keep_scale=args.keep_scale, push=args.push_to_hub)
    return 0


def cmd_provenance(args) -> int:
    from vaeflow.provenance import describe, read

    for path in args.files:
        print(f"{path}\n" + "\n".join("  " + line for line in describe(read(path)).splitlines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vaeflow", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"vaeflow {__version__}",
                   help="print vaeflow's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp, required=True, results=True, config=True):
        default = ["config/config.yaml"] if required else None
        if config:
            sp.add_argument("--config", nargs="+", default=default,
                            help="config file(s); later files override earlier ones "
                            f"(default: {default[0] if default else 'none: the schema defaults'})")
        if results:
            sp.add_argument("--results", default=RESULTS, help=f"results directory (default: {RESULTS})")
        return sp

    stage_help = "a stage name from training.pipeline.steps (`vaeflow validate` lists them)"
    sp = sub.add_parser("validate", help="check a config and print the pipeline summary (stages, modes, optimizers)")
    sp.add_argument("config_files", nargs="*", metavar="CONFIG",
                    help="config file(s), as with --config (the older positional form)")
    sp.add_argument("--config", nargs="+", default=None,
                    help="config file(s); later files override earlier ones (default: config/config.yaml)")
    sp.set_defaults(func=cmd_validate)
    sp = with_config(sub.add_parser("prepare", help=f"raw data -> {RESULTS}/{DATA} (a named run's: {RESULTS}/{DATA}-<key>)"))
    sp.add_argument("--data", default=None, metavar="JSON", help=f"a data: section as JSON instead of --config: prepares "
                    f"the copy that named runs with this data section share, {RESULTS}/{DATA}-<key>")
    sp.set_defaults(func=cmd_prepare)
    sp = with_config(sub.add_parser("train", help="train one stage"))
    sp.add_argument("--stage", required=True, help=stage_help)
    sp.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                    help="training.distributed.nnodes > 1: the rendezvous endpoint, the same on every node "
                         "(default: $VAEFLOW_RDZV_ENDPOINT)")
    sp.add_argument("--rdzv-id", default=None, help="several nodes: a run id, the same on every node "
                    "(default: $VAEFLOW_RDZV_ID, else 'vaeflow')")
    sp.set_defaults(func=cmd_train)
    sp = with_config(sub.add_parser("evaluate", help="test-split metrics of one stage"))
    sp.add_argument("--stage", required=True, help=stage_help)
    sp.set_defaults(func=cmd_evaluate)
    sp = with_config(sub.add_parser("sample", help="sample grids from a trained stage"), required=False)
    sp.add_argument("--stage", default=None, help="stage (default: the most recently updated one)")
    sp.add_argument("--checkpoints-root", dest="results", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old name of --results
    sp.add_argument("--run-name", dest="stage", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old name of --stage
    sp.add_argument("--checkpoint", choices=["best", "last", "both"], default=None,
                    help="which checkpoint(s) of the stage (default: sampling.checkpoint, best)")
    sp.add_argument("--samples", type=int, default=None, help="grid size, a perfect square (default: sampling.samples, 64)")
    sp.add_argument("--data-dir", default=None, help=f"prepared data (default: the run's, <results>/{DATA} for the default run)")
    sp.add_argument("--run", default=None, help="without --config: a named run's folder under --results (with --config: its `run` key)")
    sp.set_defaults(func=cmd_sample)
    # curves reads only <results>/<stage>/metrics.jsonl: no --config
    sp = with_config(sub.add_parser("curves", help="loss-curve PNG and CSVs of one stage from its metrics.jsonl"),
                     config=False)
    sp.add_argument("--stage", required=True, help="the stage whose <results>/<stage>/metrics.jsonl is plotted")
    sp.add_argument("--run", default=None, help="a named run: its stage under <results>/<run>/ (default: the default run)")
    sp.set_defaults(func=cmd_curves)
    summary_help = f"{RESULTS}/{{{','.join(SUMMARY_FILES)}}} across stages"
    with_config(sub.add_parser("summary", help=summary_help)).set_defaults(func=cmd_summary)
    sp = sub.add_parser("compare", help="runs side by side: final metrics per stage, config differences, "
                        "validation curves (results/compare/)")
    sp.add_argument("runs", nargs="*", metavar="RUN", help="run names (default: every run under --results; "
                    "'default' is the run without a `run` key)")
    sp.add_argument("--results", default=RESULTS, help=f"results directory (default: {RESULTS})")
    sp.add_argument("--name", default=None, help="write under <results>/compare/<name>/ (a sweep's name)")
    sp.add_argument("--by", default="psnr", help="the metric that names the winner (default: psnr)")
    sp.set_defaults(func=cmd_compare)
    # dvc.yaml's stages always write under results/ (vaeflow.layout): no --results here
    sp = with_config(sub.add_parser("dvc-yaml", help="write dvc.yaml from the config"), results=False)
    sp.add_argument("--out", default="dvc.yaml", help="file to write (default: dvc.yaml)")
    sp.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    sp.set_defaults(func=cmd_dvc_yaml)
    sp = sub.add_parser("sync-mtimes", help="after dvc pull/checkout: restore DAG-ordered mtimes so Snakemake sees outputs as current")
    sp.add_argument("--root", default=".", help="the project root holding dvc.lock (default: .)")
    sp.set_defaults(func=cmd_sync_mtimes)
    for name, fmt, text in (("export", "auto", "write a stage checkpoint as a folder other code loads: diffusers "
                             "AutoencoderKL / VQModel where the family maps, else the vaeflow format (docs/export.md)"),
                            ("export-diffusers", "diffusers", "write a stage checkpoint as a diffusers AutoencoderKL / VQModel folder")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("checkpoint", help="results/<stage>/best.pt (its eval/metrics.json gives the fitted latent scale)")
        sp.add_argument("out_dir", help="the folder to write (config.json + weights + README.md model card)")
        if name == "export":
            sp.add_argument("--format", choices=["auto", "diffusers", "vaeflow"], default="auto",
                            help="auto (default): diffusers where the family maps, else the vaeflow format")
        sp.add_argument("--keep-scale", action="store_true", help="keep the source model's scaling_factor / shift_factor "
                        "(a decoder-only fine-tune) instead of the one fitted on the test split")
        sp.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload the folder to this Hugging Face "
                        "Hub repo (refused offline: HF_HUB_OFFLINE=1 or no network)")
        sp.set_defaults(func=cmd_export, format=fmt)
    sp = sub.add_parser("provenance", help="the code fingerprint, git commit and tool versions that made a checkpoint or metrics.json")
    sp.add_argument("files", nargs="+", metavar="FILE", help="checkpoint(s) (.pt) or eval/metrics.json file(s)")
    sp.set_defaults(func=cmd_provenance)
    for action in sub._choices_actions:  # `vaeflow COMMAND --help` starts with what the command does
        sub.choices[action.dest].description = sub.choices[action.dest].description or action.help
    return p


# Commands whose result depends on the code: refused when the working directory is a checkout
# whose code is not the code that runs (vaeflow.provenance.foreign_code).
CHECKOUT_COMMANDS = ("validate", "prepare", "train", "evaluate", "sample", "curves", "summary", "dvc-yaml")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in CHECKOUT_COMMANDS:
        from vaeflow.provenance import foreign_code

        if (problem := foreign_code()) is not None:
            print(f"vaeflow: error: {problem}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except _known_errors() as exc:
        print(f"vaeflow: error: {exc}", file=sys.stderr)
        from vaeflow.trainer.launch import record_worker_error

        record_worker_error(exc)  # a torchrun worker: the launcher names this rank's error
        return 2


def reuse_freed_memory() -> None:
    """Keep freed blocks of up to 32 MB in the process for reuse (glibc's malloc), instead of
    handing them back to the OS and faulting them in again zero-filled at the next batch.
    By default glibc maps every block above its adaptive threshold afresh (a decode pass of
    the default evaluation allocates many of 8-33 MB) and trims the heap top at 128 KB: the
    default evaluate job took 400-530 thousand page faults and 1.2-1.5 s of system time, 130-210
    thousand and 0.6 s with this. Larger blocks are still mapped and returned at once, so a big
    evaluation's peak memory is unchanged. Other C libraries: nothing to do."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum for this threshold on 64-bit
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


def run(argv: list[str] | None = None) -> NoReturn:
    """The process entry (console script, `python -m vaeflow.cli`, scripts/*.py): main, with
    reuse_freed_memory, then exit without the interpreter's teardown. Freeing torch's modules
    object by object takes 0.3-0.5 CPU-s at exit, 0.5-0.9 once torch._dynamo is loaded (every
    torch.optim step loads it), in every stage job; the outputs are written and closed by then.

    Exit handlers still run (logging, multiprocessing's children, the suite census), then the
    standard streams are flushed. The normal exit stays where something still has work at
    exit: a live non-daemon thread (joined), or a profiler or tracer (`python -m cProfile`
    writes its stats, a debugger or coverage tool finishes, after the script returns)."""
    import atexit
    import os
    import threading

    reuse_freed_memory()
    rc = main(argv)
    rc = 0 if rc is None else rc
    threads = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if any(t.is_alive() and not t.daemon for t in threads) or sys.getprofile() or sys.gettrace():
        sys.exit(rc)
    atexit._run_exitfuncs()  # what a normal exit would run first (CPython's own hook)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(rc)


if __name__ == "__main__":
    run()
