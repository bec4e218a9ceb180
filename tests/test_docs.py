"""The docs name only what exists (tests/doccheck.py): config keys in the schema, `vaeflow`
commands and flags in the parser, repository paths, README sections, and no drifting numbers
in config comments. Each failure is one line: file:line: what: the name (why)."""

from __future__ import annotations

import copy
import re

import pytest

import doccheck
from doccheck import Doc, check_all
from support import REPO


def report(findings) -> str:
    return "\n".join(str(f) for f in findings)


def test_the_docs_name_only_what_exists():
    findings = check_all()
    assert not findings, f"{len(findings)} doc reference(s) to fix:\n{report(findings)}"


def test_what_is_scanned():
    files = {d.file for d in doccheck.doc_sources()}
    assert {"README.md", "CONTRIBUTING.md", "docs/data.md", "docs/evaluation.md", "docs/slurm.md",
            "docs/benchmarks.md", "config/config.yaml", "config/image_dir.yaml",
            "src/vaeflow/resources/config.schema.yaml"} <= files, files
    assert all(f.startswith("docs/") for f in files if f.endswith(".md") and "/" in f)


def renamed(schema: dict, old: str, new: str) -> dict:
    schema = copy.deepcopy(schema)
    props = schema["$defs"]["step_options"]["properties"]
    props[new] = props.pop(old)
    return schema


def test_renaming_a_key_in_the_schema_fails_the_docs_that_name_it():
    """What happens when someone renames a config key and forgets the docs: every place that
    names the old key is reported, with its file and line."""
    findings = check_all(schema=renamed(doccheck.load_schema(), "disc_start", "disc_start_step"))
    named = [f for f in findings if f.name.split(".")[-1] == "disc_start"]
    assert named, report(findings)
    assert {f.file for f in named} >= {"README.md"}, report(named)
    for f in named:
        line = (REPO / f.file).read_text().splitlines()[f.line - 1]
        assert "disc_start" in line, f"{f}: line {f.line} is {line!r}"


def synthetic(text: str, kind: str = "md") -> list[str]:
    return [str(f) for f in check_all(docs=[Doc("doc.md", text, kind)], citations=[Doc("doc.md", text, kind)])]


@pytest.mark.parametrize("text, expected", [
    ("Set `data.split.vall` here.", "doc.md:1: config key: data.split.vall (no key `vall` there"),
    ("Each step's `training.pipeline.steps[1].disc_startt`.", "config key: training.pipeline.steps.disc_startt"),
    ("relative: `split.tst`", "config key: split.tst (no key `tst` under `split`"),
    ("`model.base_chh: 32`", "config key: model.base_chh (`base_chh` is not an option of any model type"),
    ("```yaml\ntraining:\n  nonfinite: {max_consecutive: 3, lr_backof: 0.5}\n```",
     "doc.md:3: config key in a YAML block: training.nonfinite.lr_backof"),
    ("```bash\nvaeflow train --stage x --stag y\n```", "vaeflow command: vaeflow train --stage x --stag y (`vaeflow train --stag`: no such flag)"),
    ("```bash\nvaeflow dvc-yaml --config config/config.yaml --results r\n```", "`vaeflow dvc-yaml --results`: no such flag"),
    ("`python scripts/evaluate.py --stagee s`", "`vaeflow evaluate --stagee`: no such flag"),
    ("```\n$ vaeflow trian\n```", "`vaeflow trian`: no such command"),
    ("```bash\nvaeflow train --config c \\\n  --rdzv-endpont h:1\n```", "`vaeflow train --rdzv-endpont`: no such flag"),
    ("Presets: `config/presets-data/*.yaml`.", "doc.md:1: repository path: config/presets-data/*.yaml (no such file"),
    ("See [x](docs/slurm.md#no-such-section).", "link: docs/slurm.md#no-such-section (no heading with anchor"),
    ('The guard (README "Stability").', 'doc.md:1: README section: "Stability" (README.md has no such heading'),
    ("`prepare` downloads the raw data when it is missing and `data.download` is\ntrue (MNIST, CelebA).",
     "doc.md:2: download claim: celeba (only mnist can be downloaded by prepare)"),
])
def test_each_kind_of_drift_is_reported_with_file_line_and_name(text, expected):
    got = synthetic(text)
    assert any(expected in g for g in got), f"expected {expected!r} in:\n" + "\n".join(got)


def test_drifting_numbers_in_config_comments_are_reported():
    comments = "\n\n27.71 dB test PSNR; a second epoch adds 0.2 dB for ~7 s"
    got = [str(f) for f in check_all(docs=[Doc("config/x.yaml", comments, "yaml-comments")], citations=[])]
    assert "config/x.yaml:3: measurement in a config comment: 27.71 dB" in got[0], got


@pytest.mark.parametrize("text", [
    "`results/<stage>/eval/metrics.json`, `running/last.pt`, `$TORCH_HOME/hub/checkpoints/x.pth`",
    "`torch.load`, `vaeflow.trainer.launch`, `nll.likelihood`, `config.yaml`",
    "scikit-learn's bundled digits; no download. MNIST is downloaded through torchvision.",
    "```\nvaeflow: error: config error in data.split\nversions: torch 2.14.1, vaeflow 0.1.0\n```",
    "`training.pipeline.steps.<i>`, `model.ch_mult`, `evaluation.device: cuda`, `vaeflow --version`",
    "diffusers' `vae.config.scaling_factor`, `model.encode`, `model.load_state_dict`, `device.type`",
])
def test_what_is_not_a_name_is_not_reported(text):
    assert synthetic(text) == []


def test_readme_keeps_the_ci_markers_and_its_length():
    text = (REPO / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines (at most 300: details go to docs/)"
    for marker in ("<!-- main-command -->", "<!-- test-command -->"):
        i = lines.index(marker)
        assert lines[i + 1].startswith("```") and lines[i + 2].startswith("python3 -m venv .venv"), marker
    assert re.search(r"^snakemake --cores 8 --configfile config/image_dir\.yaml", text, re.M)  # own images: one command


def test_license_and_citation():
    import hashlib
    import tomllib

    import yaml

    text = (REPO / "LICENSE").read_text()
    assert text.strip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    # the Apache Software Foundation's LICENSE-2.0.txt, unchanged
    assert hashlib.md5((REPO / "LICENSE").read_bytes()).hexdigest() == "3b83ef96387f14655fc854ddc3c6bd57"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "Apache-2.0"
    assert cff["version"] == project["version"] and cff["title"] and cff["authors"] and cff["message"]
    assert (REPO / "CHANGELOG.md").read_text().startswith("# Changelog")
