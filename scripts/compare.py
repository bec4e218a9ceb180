"""Entry point of the Snakemake compare rule: `vaeflow compare`."""

import sys

from vaeflow.cli import run

run(["compare", *sys.argv[1:]])
