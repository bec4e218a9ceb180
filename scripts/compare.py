"""Stage entry point run by Snakemake (rules/runs.smk, a sweep's comparison): `vaeflow compare`."""

import sys

import _checkout  # noqa: F401  this checkout's src/ first: its code is the code that runs

from vaeflow.cli import run

run(["compare", *sys.argv[1:]])
