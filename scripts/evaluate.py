"""Stage entry point run by Snakemake (rules/) and DVC (dvc.yaml): `vaeflow evaluate`."""

import sys

from vaeflow.cli import main

sys.exit(main(["evaluate", *sys.argv[1:]]))
