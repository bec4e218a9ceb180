"""vaeflow.provenance: one definition of "the code" for both runners, and the record."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from support import REPO, run
from vaeflow import provenance


def test_fingerprint_follows_code_not_byte_caches(tmp_path):
    pkg = tmp_path / "vaeflow"
    shutil.copytree(provenance.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = provenance.code_fingerprint(pkg)
    assert before == provenance.code_fingerprint(provenance.PACKAGE_DIR)  # same files, same print
    (pkg / "losses" / "__pycache__").mkdir()
    (pkg / "losses" / "__pycache__" / "recon.cpython-311.pyc").write_bytes(b"\0cache")
    provenance.code_fingerprint.cache_clear()
    assert provenance.code_fingerprint(pkg) == before
    (pkg / "losses" / "recon.py").write_text((pkg / "losses" / "recon.py").read_text() + "# edit\n")
    provenance.code_fingerprint.cache_clear()
    assert provenance.code_fingerprint(pkg) != before
    assert all(p.suffix in (".py", ".yaml") for p in provenance.code_files(pkg))


def test_dvcignore_and_dvc_yaml_use_the_same_definition():
    patterns = {line.strip() for line in (REPO / ".dvcignore").read_text().splitlines()}
    assert {p if p.startswith("*") else f"{p}/" for p in provenance.IGNORED} <= patterns
    dvc_yaml = (REPO / "dvc.yaml").read_text()
    assert dvc_yaml.count(f"- {provenance.CODE_DIR}\n") == dvc_yaml.count("cmd: ")  # every stage
    assert (REPO / provenance.CODE_DIR) == provenance.PACKAGE_DIR


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_git_state_clean_dirty_and_no_repo(tmp_path):
    assert provenance.git_state(tmp_path) == {"commit": None, "dirty": None}
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@t")
    git(tmp_path, "config", "user.name", "t")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "dvc.lock").write_text("stages: {}\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "c")
    state = provenance.git_state(tmp_path)
    assert len(state["commit"]) == 40 and state["dirty"] is False
    (tmp_path / "dvc.lock").write_text("stages: {a: {}}\n")  # a runner's record: not a source edit
    (tmp_path / "new.txt").write_text("untracked\n")
    assert provenance.git_state(tmp_path)["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provenance.git_state(tmp_path)["dirty"] is True


def test_record_has_no_times_hosts_or_paths():
    rec = provenance.record(REPO)
    assert set(rec) == {"code_fingerprint", "git", "versions"}
    assert {"torch", "snakemake", "dvc", "python"} <= set(rec["versions"])
    text = json.dumps(rec)
    assert str(REPO) not in text and "/" not in text.replace("vaeflow package", "")


@pytest.mark.parametrize("name, content, message", [
    ("x.jsonl", "{}", "expected a checkpoint (.pt) or an eval metrics.json"),
    ("m.json", "{nope", "not valid JSON"),
    ("m.json", "{}", "no provenance recorded"),
    ("b.pt", "not a torch file", "cannot be read"),
])
def test_provenance_command_refuses_in_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    res = run(["vaeflow", "provenance", name], tmp_path, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert message in line, line
