"""Stage entry point run by Snakemake (rules/) and DVC (dvc.yaml): `vaeflow curves`."""

import sys

from vaeflow.cli import run

run(["curves", *sys.argv[1:]])
