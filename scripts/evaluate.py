"""Stage entry point run by Snakemake (rules/) and DVC (dvc.yaml): `vaeflow evaluate`."""

import sys

import _checkout  # noqa: F401  this checkout's src/ first: its code is the code that runs

from vaeflow.cli import run

run(["evaluate", *sys.argv[1:]])
