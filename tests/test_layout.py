"""vaeflow.layout owns the results/ paths; the Snakefile reads them without loading torch."""

from __future__ import annotations

import re
import subprocess
import sys

from support import REPO
from vaeflow.layout import Layout


def test_snakefile_imports_do_not_load_torch():
    """rules/common.smk builds the DAG from vaeflow's torch-free modules only (fast `snakemake -n`)."""
    text = (REPO / "rules" / "common.smk").read_text()
    imports = re.findall(r"^(?:from vaeflow\S* import .+|import vaeflow\S*)$", text, flags=re.M)
    assert any("vaeflow.layout" in line for line in imports)
    probe = "\n".join([*imports, "import sys", "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"])
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_stage_paths_and_prior_checkpoint(tmp_path):
    layout = Layout(tmp_path)
    assert layout.prior_checkpoint(["a", "b", "c"], "a") is None
    assert layout.prior_checkpoint(["a", "b", "c"], "c") == tmp_path / "b" / "best.pt"
    s = layout.stage("{stage}")  # a Snakemake wildcard is a stage name like any other
    assert str(s.best).endswith("/{stage}/best.pt") and s.work("last.pt") == s.running / "last.pt"
    outs = Layout().outputs("s1", "last")
    assert outs["train"] == ["results/s1/best.pt", "results/s1/last.pt", "results/s1/metrics.jsonl"]
    assert outs["sample"][-1] == "results/s1/samples/sampling_last.json"
