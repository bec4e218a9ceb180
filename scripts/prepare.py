"""Stage entry point run by Snakemake (rules/) and DVC (dvc.yaml): `vaeflow prepare`."""

import sys

from vaeflow.cli import main

sys.exit(main(["prepare", *sys.argv[1:]]))
