"""`vaeflow <args>` with the recording probe on (tests/workers/dist_probe.py): probe_train.py OUT_DIR ARGS..."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dist_probe import install, run_cli  # noqa: E402

install(sys.argv[1])
sys.exit(run_cli(sys.argv[2:]))
