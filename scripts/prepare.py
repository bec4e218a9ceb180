"""Stage entry point run by Snakemake (rules/) and DVC (dvc.yaml): `vaeflow prepare`."""

import sys

from vaeflow.cli import run

run(["prepare", *sys.argv[1:]])
