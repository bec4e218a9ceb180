"""Stage entry point run by Snakemake (rules/) and DVC (dvc.yaml): `vaeflow curves`."""

import sys

from vaeflow.cli import main

sys.exit(main(["curves", *sys.argv[1:]]))
