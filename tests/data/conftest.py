import sys
from pathlib import Path

# Test this checkout's data layer even when another checkout of vaeflow (a regular
# package, e.g. an editable install of the main tree) is importable too.
SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import vaeflow  # noqa: E402

_pkg = str(SRC / "vaeflow")
if isinstance(vaeflow.__path__, list) and _pkg not in vaeflow.__path__:
    vaeflow.__path__.insert(0, _pkg)
assert "vaeflow.data" not in sys.modules or str(SRC) in sys.modules["vaeflow.data"].__file__
