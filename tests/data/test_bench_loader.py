import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_loader.py"


def test_bench_loader_smoke(capsys):
    spec = importlib.util.spec_from_file_location("bench_loader", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--n", "40", "--size", "16", "--batch-size", "8", "--epochs", "1"])
    assert result["imagefolder_ips"] > 0 and result["prepared_ips"] > 0 and result["ratio"] > 0
    assert "ratio (prepared / ImageFolder)" in capsys.readouterr().out


def test_bench_loader_share_smoke(capsys):
    """The loader-share benchmark drives the trainer's own step API: it broke once, silently,
    when optimizer_step gained an argument."""
    from support import TINY

    bench = BENCH.parent / "bench_loader_share.py"
    spec = importlib.util.spec_from_file_location("bench_loader_share", bench)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--config", str(TINY), "--steps", "1"])
    out = capsys.readouterr().out
    assert "loader share of the step:" in out and "train step (fwd+bwd+opt+EMA):" in out, out
