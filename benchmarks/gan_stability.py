"""GAN-stage stability on digits: the validation PSNR around the start of the adversarial loss.

Trains the default config's `vae_gan` stage (config/config.yaml: lambda_adv 0.1, adaptive
weight, AdamW 2e-4 for both G and D, EMA 0.999) from one shared `vae_warmup` checkpoint,
under four settings, for the same number of optimizer steps:

    same-start  disc_start = gan_start = A          D and G's adversarial loss start together
    d-warmup    disc_start = 0, gan_start = A       D trains A steps before it shapes G
    lecam       same-start + lambda_lecam           LeCAM regularization of D
    nan         same-start + VAEFLOW_FAULT=nan@step:A+20   an injected NaN, recovered by the guard

The stage validates every `--eval-every` steps (an "epoch" of that many batches) and the
script records the validation PSNR (unit range, 10 log10(1 / MSE)) of the raw generator
weights and of the EMA weights. It prints, per setting (mean over `--seeds`): PSNR just
before the adversarial loss starts (step A), just after (step A + eval_every), the lowest
PSNR after the start, and at the end, plus the largest logged adv_weight.

    # docs/benchmarks.md's tables (2 CPU cores shared with other jobs: 44 min and 18 min, the earlier
    # default recipe):
    python benchmarks/gan_stability.py --seeds 0 1
    python benchmarks/gan_stability.py --seeds 0 --only same-start d-warmup lecam --set adaptive_weight=false
    # quick check:
    python benchmarks/gan_stability.py --steps 40 --adv-start 10 --eval-every 10 --seeds 0

The warm-up (the default config's vae_warmup stage, a minute or so on a CPU) runs once and is reused
from `--work` on later invocations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO / "src"))

from vaeflow import config as cfg  # noqa: E402
from vaeflow.data import PreparedDataset, prepare_dataset  # noqa: E402
from vaeflow.trainer import StageTrainer, run_stage  # noqa: E402
from vaeflow.trainer.faults import ENV as FAULT_ENV  # noqa: E402
from vaeflow.trainer.validation import validate  # noqa: E402


def psnr(mse_signed: float) -> float:
    """val_recon is the MSE in the model's [-1, 1] range: 4x the [0, 1] MSE."""
    return 10 * math.log10(4.0 / mse_signed)


class Recorder(StageTrainer):
    """The stage trainer, also recording the validation PSNR of the raw and EMA weights
    before each epoch end (where the stage validates)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.curve: list[dict] = []

    def _end_epoch(self, train_means: dict) -> None:
        bs, device = self.config["evaluation"]["batch_size"], self.devices.main
        point = {"step": self.state.global_step}
        for kind, model in (("raw", self.models.model), ("ema", self.models.eval_model())):
            point[kind] = psnr(validate(model, self.val_data, self.objective, bs, device)["val_recon"])
        self.curve.append(point)
        super()._end_epoch(train_means)


def settings(a: int, lecam: float) -> dict[str, tuple[dict, str | None]]:
    return {
        "same-start": ({"disc_start": a, "gan_start": a}, None),
        "d-warmup": ({"disc_start": 0, "gan_start": a}, None),
        "lecam": ({"disc_start": a, "gan_start": a, "lambda_lecam": lecam}, None),
        "nan": ({"disc_start": a, "gan_start": a}, f"nan@step:{a + 20}:stage=vae_gan"),
    }


def base_config(args) -> dict:
    raw = yaml.safe_load((_REPO / "config" / "config.yaml").read_text())
    raw["training"]["sample_every_epoch"] = False
    raw["training"]["log_every"] = args.eval_every
    return raw


def warm_up(raw: dict, work: Path) -> Path:
    config = cfg.validate(raw)
    prepare_dataset(config["data"], work / "data")
    best = work / "warm" / "vae_warmup" / "best.pt"
    if best.exists():
        print(f"reusing the warm-up checkpoint {best}", flush=True)
        return best
    (work / "warm").mkdir(parents=True, exist_ok=True)
    if not (work / "warm" / "data").exists():
        (work / "warm" / "data").symlink_to(work / "data")
    t = time.perf_counter()
    run_stage(config, "vae_warmup", work / "warm")
    print(f"warm-up: {time.perf_counter() - t:.0f} s", flush=True)
    return best


def run_setting(raw: dict, work: Path, name: str, overrides: dict, fault: str | None, seed: int, args) -> dict:
    raw = json.loads(json.dumps(raw))
    raw["seed"] = seed
    gan = raw["training"]["pipeline"]["steps"][1]
    gan.update(args.set or {})
    gan.update(overrides, n_epochs=args.steps // args.eval_every, max_steps=args.eval_every)
    config = cfg.validate(raw)
    out = work / f"{name}_s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "data").symlink_to(work / "data")
    (out / "vae_warmup").symlink_to(work / "warm" / "vae_warmup")
    train = PreparedDataset(work / "data", "train", binarize=config["data"]["binarize"], seed=seed)
    val = PreparedDataset(work / "data", "val", binarize="none", seed=seed)
    os.environ.pop(FAULT_ENV, None)
    if fault:
        os.environ[FAULT_ENV] = fault
    try:
        t = time.perf_counter()
        trainer = Recorder(config, "vae_gan", out, train, val)
        summary = trainer.run()
        seconds = time.perf_counter() - t
    finally:
        os.environ.pop(FAULT_ENV, None)
    weights = [r["metrics"].get("adv_weight") for r in map(json.loads, (out / "vae_gan" / "metrics.jsonl").read_text().splitlines())
               if r["split"] == "train"]
    return {"curve": trainer.curve, "summary": summary, "seconds": seconds,
            "max_adv_weight": max((w for w in weights if w is not None), default=None)}


def row(runs: list[dict], a: int, e: int) -> dict:
    def at(run, step, kind):
        return next(p[kind] for p in run["curve"] if p["step"] >= step)

    def mean(values):
        values = list(values)
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    return {
        "before": mean(at(r, a, "raw") for r in runs),
        "after": mean(at(r, a + e, "raw") for r in runs),
        "min_after": mean(min(p["raw"] for p in r["curve"] if p["step"] > a) for r in runs),
        "end": mean(r["curve"][-1]["raw"] for r in runs),
        "end_ema": mean(r["curve"][-1]["ema"] for r in runs),
        "max_adv_weight": max(r["max_adv_weight"] or 0.0 for r in runs),
        "skipped": sum(r["summary"].get("nonfinite_skipped", 0) for r in runs),
        "rollbacks": sum(r["summary"].get("rollbacks", 0) for r in runs),
        "seconds": mean(r["seconds"] for r in runs)[0],
    }


def table(rows: dict, args) -> str:
    a, e = args.adv_start, args.eval_every

    def f(v):
        return f"{v[0]:.2f} ± {v[1]:.2f}" if len(args.seeds) > 1 else f"{v[0]:.2f}"

    lines = [
        f"| setting | PSNR step {a} (before) | step {a + e} (after) | lowest after {a} | step {args.steps} (end) "
        f"| end, EMA | max adv_weight | skips / rollbacks |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {f(r['before'])} | {f(r['after'])} | {f(r['min_after'])} | {f(r['end'])} "
                     f"| {f(r['end_ema'])} | {r['max_adv_weight']:.3g} | {r['skipped']} / {r['rollbacks']} |")
    return "\n".join(lines)


def _key_value(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    return key, yaml.safe_load(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=120, help="optimizer steps of the GAN stage")
    p.add_argument("--adv-start", type=int, default=40, help="A: the step the generator's adversarial loss starts")
    p.add_argument("--eval-every", type=int, default=10, help="validate every this many steps")
    p.add_argument("--lecam", type=float, default=0.1, help="lambda_lecam of the lecam setting")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="*", help="run only these settings")
    p.add_argument("--set", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="override a key of the vae_gan step (YAML value), e.g. --set adaptive_weight=false")
    p.add_argument("--work", type=Path, default=Path("results/bench_gan_stability"))
    args = p.parse_args()
    args.set = dict(args.set or [])
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    print(f"steps={args.steps} adv_start={args.adv_start} eval_every={args.eval_every} seeds={args.seeds} "
          f"vae_gan overrides={args.set} OMP_NUM_THREADS={torch_threads}", flush=True)
    raw = base_config(args)
    warm_up(raw, args.work)
    rows, results = {}, {}
    for name, (overrides, fault) in settings(args.adv_start, args.lecam).items():
        if args.only and name not in args.only:
            continue
        runs = [run_setting(raw, args.work, name, overrides, fault, s, args) for s in args.seeds]
        results[name] = runs
        rows[name] = row(runs, args.adv_start, args.eval_every)
        print(f"{name}: {rows[name]}", flush=True)
    (args.work / "gan_stability.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                              "runs": results, "rows": rows}, indent=1))
    print(table(rows, args))


if __name__ == "__main__":
    main()
