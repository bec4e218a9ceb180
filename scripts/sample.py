"""Stage entry point run by Snakemake (rules/) and DVC (dvc.yaml): `vaeflow sample`."""

import sys

from vaeflow.cli import run

run(["sample", *sys.argv[1:]])
