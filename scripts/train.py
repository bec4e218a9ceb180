"""Stage entry point run by Snakemake (rules/) and DVC (dvc.yaml): `vaeflow train`."""

import sys

from vaeflow.cli import run

run(["train", *sys.argv[1:]])
