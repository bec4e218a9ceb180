"""Property-based fuzz: no config, however mangled, gives a traceback.

Hypothesis mutates the default config (config/config.yaml) 200 ways (derandomized, so CI
sees the same 200): type swaps, out-of-range and huge numbers, deleted keys, added keys,
empty and long lists, long strings, 1-3 mutations at once. For each:
- `vaeflow validate` (in-process, all 200) exits 0, or 2 with one line `vaeflow: error: ...`;
- `vaeflow prepare` (in-process, into a temp dir) the same, for every config validate
  accepts (it validates identically first), on the digits subset `data.limit: 60` unless
  the mutation touched data.limit (mnist never downloads here: data.download is forced
  off, the sandbox has no network);
- `snakemake -n` (a subprocess, ~2 s each: every 20th example, 10 in all) exits 0, or 1
  with the one-line config error and no Python traceback.
"""

from __future__ import annotations

import copy
import io
import time
from contextlib import redirect_stderr, redirect_stdout

import pytest
import yaml

from support import REPO, make_project, run
from vaeflow.cli import main as vaeflow_main

pytestmark = pytest.mark.slow

BASE = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
BASE["data"]["limit"] = 60  # prepare stays fast; a mutation of data.limit still applies
EXAMPLES = 200
SNAKEMAKE_EVERY = 20

ODD_VALUES = ["abc", "", "x" * 5000, 0, -1, 1, 3, 2.5, -0.0, 1e308, -1e308, 10**12, -(10**12), 2**63,
              True, False, None, [], {}, [1, 2], [0], ["a", "b"], {"x": 1}, [[1]], [None]]


def paths(node, prefix=()):
    """Every key path (dict keys and list indices) of the config."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, prefix + (i,))
    return out


PATHS = paths(BASE)


def parent_of(cfg, path):
    node = cfg
    for p in path[:-1]:
        node = node[p]
    return node


def mutate(cfg, path, op, value):
    """Apply one mutation in place; a path that an earlier mutation removed is skipped."""
    try:
        parent = parent_of(cfg, path)
        key = path[-1]
        old = parent[key]
    except (KeyError, IndexError, TypeError):
        return
    if op == "set":
        parent[key] = copy.deepcopy(value)
    elif op == "delete":
        del parent[key]
    elif op == "add_key" and isinstance(old, dict):
        old["surprise_key"] = value
    elif op == "empty":
        parent[key] = type(old)() if isinstance(old, (list, dict, str)) else None
    elif op == "huge" and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = old * 10**9 + 10**9
    elif op == "negate" and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = -old - 1
    elif op == "long_list" and isinstance(old, list):
        parent[key] = (old or [1]) * 200
    elif op == "wrap":
        parent[key] = [old]


def mutation_strategy():
    """(path, op, value) for mutate(). Hypothesis is imported here, not at collection: 1 s per
    pytest-xdist worker that never runs this file."""
    from hypothesis import strategies as st

    return st.tuples(
        st.sampled_from(PATHS),
        st.sampled_from(["set", "set", "set", "delete", "add_key", "empty", "huge", "negate", "long_list", "wrap"]),
        st.sampled_from(ODD_VALUES),
    )


def check_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        rc = vaeflow_main(argv)  # any exception other than the known ones propagates: a failure
    text = err.getvalue().strip()
    assert rc in (0, 2), (argv, rc, text)
    if rc == 2:
        lines = text.splitlines()
        assert len(lines) == 1 and lines[0].startswith("vaeflow: error: "), text
    return rc, text


def test_mutated_configs_never_give_a_traceback(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    project = make_project(tmp_path_factory.mktemp("fuzz") / "project")
    seen = {"n": 0, "snakemake": 0, "validate_ok": 0, "prepare_ok": 0, "prepare_refused": 0}

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(mutations=st.lists(mutation_strategy(), min_size=1, max_size=3))
    def one(mutations):
        cfg = copy.deepcopy(BASE)
        for path, op, value in mutations:
            mutate(cfg, path, op, value)
        if isinstance(cfg.get("data"), dict) and cfg["data"].get("dataset") == "mnist":
            cfg["data"]["download"] = False
        tmp = tmp_path_factory.mktemp("cfg")
        path = tmp / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        rc, _ = check_cli(["validate", str(path)])
        seen["validate_ok"] += rc == 0
        if rc == 0:  # prepare validates the same way first: a refused config gets the same line
            rc, _ = check_cli(["prepare", "--config", str(path), "--results", str(tmp / "results")])
            seen["prepare_ok"] += rc == 0
            if rc == 2:
                seen["prepare_refused"] += 1
                assert not (tmp / "results" / "data").exists(), "a refused prepare left files behind"
        seen["n"] += 1
        if seen["n"] % SNAKEMAKE_EVERY == 0:
            seen["snakemake"] += 1
            (project / "config" / "config.yaml").write_text(path.read_text())
            res = run(["snakemake", "-n", "--cores", "1"], project, check=False)
            out = res.stdout + res.stderr
            assert "Traceback" not in out, out[-3000:]
            # A clean refusal: the config error, or a missing raw-data folder named by Snakemake.
            assert res.returncode == 0 or "config error" in out or "MissingInputException" in out, out[-3000:]

    t0 = time.perf_counter()
    one()
    print(f"fuzz: {seen} in {time.perf_counter() - t0:.1f} s")
    # It really exercised all three commands, with configs both accepted and refused.
    assert seen["n"] >= EXAMPLES and seen["snakemake"] >= EXAMPLES // SNAKEMAKE_EVERY, seen
    assert 0 < seen["validate_ok"] < seen["n"] and seen["prepare_ok"] > 0, seen
