"""Wall time of the default pipeline, job by job, and of the no-op checks.

    python benchmarks/bench_pipeline.py [--config config/config.yaml] [--cores 8] [--keep DIR]

Copies this checkout's files (tracked and untracked-not-ignored, as a fresh clone would
have them plus your uncommitted edits) into a temp directory, runs `git init` there (`.dvc/`
is part of the checkout), then:

1. `snakemake --cores N` (the README's main job), timed end to end;
2. per-job times from `results/benchmarks/*.tsv` (Snakemake's `benchmark:` files);
3. the test PSNR of every stage (`results/<stage>/eval/metrics.json`);
4. `snakemake -n` on the finished run (nothing to do), the fastest of --repeat runs;
5. `dvc commit -f` (records the finished run in dvc.lock without rerunning), then
   `dvc status` and `snakemake -n` again (the Snakefile's mtime sync reads dvc.lock).

Uses the `snakemake`, `dvc` and `python` next to this interpreter. Prints a table last.
Measured times are wall-clock: on a loaded machine they are inflated.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def sh(cmd: str, cwd: Path, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=_env(), shell=True, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if check and res.returncode != 0:
        sys.exit(f"`{cmd}` failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return dt, res


def copy_checkout(dest: Path) -> None:
    """The files a fresh clone has, plus uncommitted edits and new untracked files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = REPO / rel
        if not src.is_file() or rel.startswith(("tests/", "benchmarks/")):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel, follow_symlinks=False)


def job_times(results: Path) -> dict[str, tuple[float, float]]:
    """{job: (wall seconds, CPU seconds)} from Snakemake's benchmark TSVs (columns s, cpu_time)."""
    out = {}
    for tsv in sorted((results / "benchmarks").glob("*.tsv")):
        with open(tsv) as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if rows:
            out[tsv.stem] = (float(rows[-1]["s"]), float(rows[-1].get("cpu_time") or "nan"))
    return out


def first_and_fastest(cmd: str, cwd: Path, repeat: int) -> tuple[float, float, str]:
    """Wall time of the first run, the fastest of `repeat` runs, and the last line printed."""
    times, last = [], None
    for _ in range(repeat):
        dt, last = sh(cmd, cwd)
        times.append(dt)
    lines = (last.stdout + last.stderr).strip().splitlines() if last else []
    return times[0], min(times), lines[-1] if lines else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="a preset to use as config/config.yaml (default: the checkout's)")
    ap.add_argument("--cores", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each no-op check (the fastest is reported)")
    ap.add_argument("--keep", default=None, help="run in this (new) directory and keep it")
    args = ap.parse_args(argv)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vaeflow-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        copy_checkout(work)
        if args.config:
            shutil.copy(args.config, work / "config" / "config.yaml")
        sh("git init -q && git config user.email b@b && git config user.name b", work)  # .dvc/ comes with the checkout
        print(f"work dir: {work}", flush=True)

        total, _ = sh(f"snakemake --cores {args.cores}", work)
        print(f"snakemake --cores {args.cores}: {total:.1f} s", flush=True)
        jobs = job_times(work / "results")
        psnr = {}
        for p in sorted((work / "results").glob("*/eval/metrics.json")):
            psnr[p.parent.parent.name] = json.loads(p.read_text()).get("psnr")

        smk = first_and_fastest("snakemake -n --cores 1", work, args.repeat)
        t_commit, _ = sh("dvc commit -f -q", work)
        dvc = first_and_fastest("dvc status", work, args.repeat)
        smk_lock = first_and_fastest("snakemake -n --cores 1", work, args.repeat)

        print(f"\nsnakemake -n says: {smk[2]}\ndvc status says: {dvc[2]}\n"
              f"snakemake -n (dvc.lock) says: {smk_lock[2]}")
        print("\ntest PSNR (dB): " + ", ".join(f"{s} {v:.2f}" for s, v in psnr.items() if v is not None))
        print("\n| what | wall s | CPU s |\n| --- | --- | --- |")
        for name, (wall, cpu) in jobs.items():
            print(f"| job {name} | {wall:.1f} | {cpu:.1f} |")
        print(f"| sum of jobs | {sum(w for w, _ in jobs.values()):.1f} | {sum(c for _, c in jobs.values()):.1f} |")
        print(f"| **snakemake --cores {args.cores}, end to end** | **{total:.1f}** | |")
        for name, (first, best, _) in (("snakemake -n, finished run", smk), ("dvc status, after dvc commit", dvc),
                                       ("snakemake -n, finished run with dvc.lock", smk_lock)):
            print(f"| {name} (first / fastest of {args.repeat}) | {first:.2f} / {best:.2f} | |")
        print(f"| dvc commit -f (records the run in dvc.lock) | {t_commit:.1f} | |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
