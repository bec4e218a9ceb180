"""Stage entry point run by Snakemake (rules/) and DVC (dvc.yaml): `vaeflow curves`."""

import sys

import _checkout  # noqa: F401  this checkout's src/ first: its code is the code that runs

from vaeflow.cli import run

run(["curves", *sys.argv[1:]])
