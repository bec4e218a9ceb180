"""Stage entry point run by Snakemake (rules/) and DVC (dvc.yaml): `vaeflow summary`."""

import sys

from vaeflow.cli import run

run(["summary", *sys.argv[1:]])
