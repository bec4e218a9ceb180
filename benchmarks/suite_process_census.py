"""Every Python process a pytest run starts, by kind: how many, their CPU seconds, and how many
imported torch and torch._dynamo. Where the suite's time goes when it is CPU-bound.

    python benchmarks/suite_process_census.py                 # the whole suite (the README's test command, its pytest part)
    python benchmarks/suite_process_census.py -m "not slow"   # any pytest arguments

`pytest_cpu_per_test.py` counts the children each test waits for; this counts every Python
process, wherever it runs (SLURM jobs, torchrun workers, Snakemake's job processes), by a
temporary `.pth` file in this interpreter's site-packages that logs each process's CPU at exit.
The file is removed when the run ends. Processes killed by a signal and programs that are not
Python (git, bash, srun) do not log; the machine's busy CPU (/proc/stat) over the run is
printed beside the logged total, so their share shows as the difference. Run on demand, never
in CI.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV_KEY = "VAEFLOW_CENSUS_OUT"
HOOK_NAME = "_vaeflow_census_hook"

# Logs only where ENV_KEY is set, so Python processes outside the run are untouched; once per
# process, even where a second copy runs (the test's sitecustomize under a census).
HOOK = f'''
import os, sys
if os.environ.get("{ENV_KEY}") and not hasattr(sys, "_vaeflow_census"):
    import atexit, json, resource
    sys._vaeflow_census = True

    def _log():
        try:
            use = resource.getrusage(resource.RUSAGE_SELF)
            main = sys.modules.get("__main__")
            spec = getattr(main, "__spec__", None)
            rec = {{"argv": sys.argv[:3], "module": spec.name if spec else None,
                    "cpu": use.ru_utime + use.ru_stime,
                    "torch": "torch" in sys.modules, "dynamo": "torch._dynamo" in sys.modules,
                    "pytest": "_pytest" in sys.modules, "job": "--target-jobs" in sys.argv}}
            with open(os.environ["{ENV_KEY}"], "a") as f:
                f.write(json.dumps(rec) + "\\n")
        except Exception:
            pass

    atexit.register(_log)
'''


def busy_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def kind(rec: dict) -> str:
    """A short name for what a process was."""
    argv, module = rec["argv"] or [""], rec["module"]
    if rec["pytest"]:
        return "pytest (tests run in-process)"
    name = module or Path(argv[0]).name
    if name.startswith("snakemake"):
        return "snakemake, a job's (--target-jobs)" if rec.get("job") else "snakemake"
    if name in ("vaeflow", "vaeflow.cli", "cli.py"):
        return f"vaeflow {argv[1] if len(argv) > 1 else ''}".strip()
    if Path(argv[0]).parent.name == "scripts":  # Snakemake's script: runs a copy named tmpXXXXXXXX.<name>.py
        return f"scripts/{re.sub(r'^tmp[0-9a-z_]{8}[.]', '', Path(argv[0]).name)}"
    return name


def report(recs: list[dict], busy: float, wall: float, cpus: int) -> str:
    """The census as text: the machine's busy CPU, then one table row per kind, most CPU first."""
    groups = collections.defaultdict(list)
    for r in recs:
        groups[kind(r)].append(r)
    logged = sum(r["cpu"] for r in recs)
    lines = [f"the machine was busy {busy:.0f} CPU-s of {wall * cpus:.0f} ({cpus} CPUs, {wall:.0f} s)",
             f"{len(recs)} Python processes logged {logged:.0f} CPU-s; {busy - logged:.0f} CPU-s went to "
             "processes that did not log (killed by a signal, or not Python) and to the system", "",
             "| process | count | CPU s | CPU s each | imported torch | imported torch._dynamo |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, rs in sorted(groups.items(), key=lambda kv: -sum(r["cpu"] for r in kv[1])):
        cpu = sum(r["cpu"] for r in rs)
        lines.append(f"| {name} | {len(rs)} | {cpu:.1f} | {cpu / len(rs):.2f} | "
                     f"{sum(r['torch'] for r in rs)} | {sum(r['dynamo'] for r in rs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    site = Path(sysconfig.get_paths()["purelib"])
    pth, hook = site / f"{HOOK_NAME}.pth", site / f"{HOOK_NAME}.py"
    if pth.exists():
        print(f"{pth} exists: another census is running (or one was killed; delete it)", file=sys.stderr)
        return 2
    fd, name = tempfile.mkstemp(prefix="census_", suffix=".jsonl")
    os.close(fd)  # the processes append to it by name
    out = Path(name)
    hook.write_text(HOOK)
    pth.write_text(f"import {HOOK_NAME}\n")
    try:
        busy0, t0 = busy_cpu_seconds(), time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", *args], cwd=REPO,
                             env={**os.environ, ENV_KEY: str(out)})
        busy, wall = busy_cpu_seconds() - busy0, time.perf_counter() - t0
    finally:
        pth.unlink(missing_ok=True)
        hook.unlink(missing_ok=True)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    out.unlink()
    print(f"\npytest exit code {rc}, {wall:.0f} s wall")
    print(report(recs, busy, wall, os.cpu_count()))
    return rc


if __name__ == "__main__":
    sys.exit(main())
