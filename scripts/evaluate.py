"""Stage entry point run by Snakemake (rules/) and DVC (dvc.yaml): `vaeflow evaluate`."""

import sys

from vaeflow.cli import run

run(["evaluate", *sys.argv[1:]])
