"""Stage entry point run by Snakemake (rules/) and DVC (dvc.yaml): `vaeflow summary`."""

import sys

import _checkout  # noqa: F401  this checkout's src/ first: its code is the code that runs

from vaeflow.cli import run

run(["summary", *sys.argv[1:]])
