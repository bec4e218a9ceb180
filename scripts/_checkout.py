"""Imported first by every stage script: the code that runs is this checkout's.

Puts <checkout>/src first on the import path, and on PYTHONPATH for the processes a stage
starts (torchrun's workers, srun's), so a stage runs the vaeflow of the checkout its script
belongs to, whichever vaeflow the environment has: an editable install of another clone or
worktree, or, in a queued DVC experiment (a temporary copy of the repo under .dvc/tmp/exps),
the workspace it was copied from. The code fingerprint in the runners' rerun checks and in
every result's provenance is then this checkout's (docs/checkout.md).
"""

import os
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parent.parent / "src")
if Path(SRC, "vaeflow", "__init__.py").is_file():
    sys.path.insert(0, SRC)
    os.environ["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])])
