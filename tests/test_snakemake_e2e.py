"""The workflow passes `snakemake --lint`. Snakemake end to end on the tiny config (targets,
report, no-op rerun, per-stage reruns, a third stage) is in test_reproducible.py, on the
clone that its fixture has already run."""

from __future__ import annotations

import pytest

from support import REPO, run

pytestmark = pytest.mark.slow


def test_lint_and_format_clean():
    res = run(["snakemake", "--lint", "--cores", "1"], REPO, check=False)
    assert res.returncode == 0 and "Lints for" not in res.stdout + res.stderr, res.stdout + res.stderr
    files = ["workflow/Snakefile", *map(str, sorted((REPO / "rules").glob("*.smk")))]
    res = run(["snakefmt", "--check", *files], REPO, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
