"""The suite census benchmark's exit hook, run in real interpreters (as sitecustomize, so the
test never writes into the venv that runs it), and its report."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "suite_process_census.py"


def load():
    spec = importlib.util.spec_from_file_location("suite_process_census", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_hook_logs_each_process_once_and_only_when_asked(tmp_path):
    census = load()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(census.HOOK)
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    env.pop(census.ENV_KEY, None)
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    assert not log.exists()  # not asked: nothing logged

    env[census.ENV_KEY] = str(log)
    subprocess.run([sys.executable, "-c", "sum(range(10**6))"], env=env, check=True)
    subprocess.run([sys.executable, "-m", "json.tool", "--help"], env=env, check=True, capture_output=True)
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["module"] for r in recs] == [None, "json.tool"]
    assert all(r["cpu"] > 0 and not (r["torch"] or r["dynamo"] or r["pytest"] or r["job"]) for r in recs)
    assert [census.kind(r) for r in recs] == ["-c", "json.tool"]

    text = census.report(recs, busy=10.0, wall=6.0, cpus=2)
    assert "the machine was busy 10 CPU-s of 12 (2 CPUs, 6 s)" in text
    assert text.count("\n| ") == 4 and "| json.tool | 1 |" in text  # header, rule, two kinds


def test_kinds_name_what_the_suite_starts():
    kind = load().kind
    rec = dict(module=None, pytest=False)
    assert kind({**rec, "argv": ["/x/scripts/train.py", "--config"]}) == "scripts/train.py"
    assert kind({**rec, "argv": ["/v/bin/vaeflow", "evaluate"]}) == "vaeflow evaluate"
    assert kind({**rec, "argv": ["/s/src/vaeflow/cli.py", "train"]}) == "vaeflow train"
    assert kind({**rec, "argv": ["/v/snakemake/__main__.py", "--snakefile", "S"], "module": "snakemake",
                 "job": True}) == "snakemake, a job's (--target-jobs)"
    assert kind({**rec, "argv": ["/v/bin/snakemake", "-n"]}) == "snakemake"
    assert kind({**rec, "argv": ["/p/scripts/tmpq9vz_ms6.toy_job.py"]}) == "scripts/toy_job.py"
    assert kind({**rec, "argv": ["-c"], "pytest": True}) == "pytest (tests run in-process)"
