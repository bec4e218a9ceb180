"""CPU seconds of every test, its children included: where the suite's time goes.

    PYTHONPATH=benchmarks python -m pytest -q -p pytest_cpu_per_test
    python benchmarks/pytest_cpu_per_test.py [results.jsonl]     # the summary, by file

A pytest plugin: for each test, one JSON line (test id, CPU of the pytest worker itself, CPU
of the children it waited for, wall seconds, xdist worker, start time) appended to
$PYTEST_CPU_OUT (default results/pytest_cpu.jsonl). Children that outlive the test or are
not waited for (SLURM jobs, daemons) are not counted. Run on demand, never in CI.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import sys
import time
from pathlib import Path

import pytest

OUT = Path(os.environ.get("PYTEST_CPU_OUT", "results/pytest_cpu.jsonl"))


def _cpu() -> tuple[float, float]:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    (own0, kids0), t0 = _cpu(), time.time()
    try:
        return (yield)
    finally:
        own1, kids1 = _cpu()
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with open(OUT, "a") as f:  # one short line per write: workers append side by side
            f.write(json.dumps({"id": item.nodeid, "self": round(own1 - own0, 2), "children": round(kids1 - kids0, 2),
                                "wall": round(time.time() - t0, 2), "worker": os.environ.get("PYTEST_XDIST_WORKER"),
                                "start": round(t0, 1)}) + "\n")


def main(argv: list[str]) -> int:
    rows = [json.loads(line) for line in Path(argv[0] if argv else OUT).read_text().splitlines()]
    by_file: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for r in rows:
        f = by_file[r["id"].split("::")[0]]
        f[0] += r["self"] + r["children"]
        f[1] += r["self"]
        f[2] += r["wall"]
    print(f"{len(rows)} tests, {sum(v[0] for v in by_file.values()):.0f} CPU-s\n")
    print("| file | CPU s | of it in the worker | wall s |\n| --- | --- | --- | --- |")
    for name, (cpu, own, wall) in sorted(by_file.items(), key=lambda kv: -kv[1][0]):
        print(f"| {name} | {cpu:.1f} | {own:.1f} | {wall:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
