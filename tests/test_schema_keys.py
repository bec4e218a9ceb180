"""Every optional key of the one schema, set to a valid non-default value, passes
`vaeflow validate`, `snakemake -n` and DVC's dry run (`dvc repro --dry -s prepare` and
`dvc status`; see the comment in the test for why not a whole-pipeline `--dry`).

Values come from the schema itself (enum, bounds, types), so a key added to the schema
is covered without editing this file. validate runs once per key, in-process; the
subprocess runs use a few configs that combine as many keys as stay valid together.
"""

from __future__ import annotations

import copy
import io
from contextlib import redirect_stderr, redirect_stdout

import pytest
import yaml

from support import REPO, make_project, run
from vaeflow import config as vfconfig
from vaeflow.cli import main as vaeflow_main

BASE = REPO / "config" / "config.yaml"
# Keys whose other values need a companion change to stay valid (the schema can't say so).
# A companion may also override the generated value itself.
COMPANIONS = {
    "data.channels": {"model.in_channels": 3},
    "data.image_size": {"data.image_size": 32, "model.resolution": 32},
    "discriminator.n_layers": {"discriminator.n_layers": 1},
    "sampling.samples": {"sampling.samples": 16},
    "training.pipeline.defaults.train_vae": {"training.pipeline.defaults.gan_training": True},
    "training.pipeline.defaults.transition_on.mode": {
        "training.pipeline.defaults.transition_on.metric": "val_loss",
        "training.pipeline.defaults.transition_on.threshold": 0.5,
        "training.pipeline.defaults.transition_on.max_epochs": 2},
    "training.pipeline.defaults.unfreeze": {"training.pipeline.defaults.freeze": ["decoder"]},
}
# Not settable on the default (2D digits) config; the 3D preset is checked by test_presets.py.
ELSEWHERE = {"data.spatial_dims": "3 needs data.dataset: ct volumes (config/ct3d.yaml)"}


@pytest.fixture(autouse=True)
def _random_lpips_backbone(monkeypatch):
    """use_lpips needs the LPIPS weights on disk; this switch (tests only) skips that check.
    Set per test (subprocesses inherit it), never for the whole session."""
    monkeypatch.setenv("VAEFLOW_LPIPS_RANDOM_BACKBONE", "1")


def resolve(node: dict, root: dict) -> dict:
    if "$ref" in node:
        return root["$defs"][node["$ref"].split("/")[-1]]
    return node


def non_default(node: dict, current, key: str):
    """A valid value of `node` other than the schema default and the base config's value."""
    avoid = [node.get("default"), current]
    if "enum" in node:
        return next(v for v in node["enum"] if v not in avoid and v is not None)
    if "oneOf" in node:
        return non_default(node["oneOf"][0], current, key)
    types = node.get("type")
    types = [types] if isinstance(types, str) else [t for t in (types or []) if t != "null"]
    kind = types[0] if types else None
    if kind == "boolean":
        return not (current if current is not None else node.get("default", False))
    if kind in ("integer", "number"):
        lo = node.get("minimum", node.get("exclusiveMinimum", 0))
        hi = node.get("maximum", node.get("exclusiveMaximum", lo + 100))
        for cand in (lo + 1, (lo + hi) / 2, lo + 0.5, hi - 1):
            cand = int(cand) if kind == "integer" else float(cand)
            ok = lo <= cand <= hi and cand not in avoid
            ok = ok and ("exclusiveMinimum" not in node or cand > node["exclusiveMinimum"])
            ok = ok and ("exclusiveMaximum" not in node or cand < node["exclusiveMaximum"])
            if ok:
                return cand
    if kind == "string":
        if key.endswith("device"):
            return "cpu"
        return "config" if key == "data.root" else "x"
    if kind == "array":
        items = node.get("items", {})
        n = node.get("minItems", 1)
        if "enum" in items:
            return [items["enum"][0]]
        if items.get("type") == "integer":
            return list(range(1, n + 1))
        return [-2.0, 2.0][:n] if n <= 2 else [1.0] * n
    raise AssertionError(f"{key}: no generator for {node}")


def optional_keys(node: dict, root: dict, prefix: str = ""):
    """(dotted key, schema node, required siblings {key: node}) of every optional leaf key."""
    node = resolve(node, root)
    for sub in node.get("allOf", []):
        yield from optional_keys(sub, root, prefix)
    props = node.get("properties", {})
    required = {f"{prefix}{k}": resolve(props[k], root) for k in node.get("required", [])
                if k in props and resolve(props[k], root).get("type") != "object"}
    for key, sub in props.items():
        path = f"{prefix}{key}"
        sub = resolve(sub, root)
        if sub.get("type") == "object" or "properties" in sub or "$ref" in sub:
            yield from optional_keys(sub, root, path + ".")
        elif path not in required:
            yield path, sub, required


def set_key(cfg: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = cfg
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def get_key(cfg: dict, dotted: str):
    node = cfg
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def changes() -> list[tuple[str, dict]]:
    base = yaml.safe_load(BASE.read_text())
    schema = vfconfig.schema()
    out = []
    for key, node, required in optional_keys(schema, schema):
        if key in ELSEWHERE or key.startswith("training.pipeline.steps") or key == "model.type":
            continue
        siblings = {k: copy.deepcopy(get_key(base, k)) if get_key(base, k) is not None else non_default(n, None, k)
                    for k, n in required.items()}
        value = non_default(node, get_key(base, key), key)
        out.append((key, {**siblings, key: value, **COMPANIONS.get(key, {})}))
    return out


def apply(change: dict) -> dict:
    cfg = yaml.safe_load(BASE.read_text())
    for key, value in change.items():
        set_key(cfg, key, value)
    return cfg


def validate_in_process(cfg: dict, tmp_path) -> tuple[int, str]:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        rc = vaeflow_main(["validate", str(path)])
    return rc, err.getvalue()


@pytest.mark.slow  # ~115 in-process validations: 10-50 s
def test_every_optional_key_validates(tmp_path):
    chg = changes()
    assert len(chg) > 100, "the schema walk found too few keys"
    failures = []
    for key, change in chg:
        rc, err = validate_in_process(apply(change), tmp_path)
        if rc:
            failures.append(f"{key}={change[key]!r}: {err.strip()}")
    assert not failures, "\n".join(failures)


def combined(tmp_path) -> list[dict]:
    """Greedy: add each key's change to the current config while it stays valid."""
    groups: list[dict] = []
    for _, change in changes():
        for group in groups:
            trial = {**group, **change}
            if validate_in_process(apply(trial), tmp_path)[0] == 0:
                group.update(change)
                break
        else:
            groups.append(dict(change))
    return groups


@pytest.mark.slow
def test_optional_keys_pass_snakemake_and_dvc_dry_runs(tmp_path):
    groups = combined(tmp_path)
    assert len(groups) <= 8, f"{len(groups)} combined configs: too many subprocess runs"
    for i, group in enumerate(groups):
        project = make_project(tmp_path / f"p{i}")
        cfg = apply(group)
        (project / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
        run(["snakemake", "-n", "--cores", "1"], project)
        run("git init -q && dvc init -q", project)
        run(["vaeflow", "dvc-yaml", "--config", "config/config.yaml"], project)
        # DVC 3.67's whole-pipeline `repro --dry` fails in a fresh project (it hashes the
        # not-yet-made deps of later stages: "No such file ... manifest.json"), so: a dry
        # run of the first stage, and `dvc status`, which parses every stage and its params.
        run(["dvc", "repro", "--dry", "-s", "prepare"], project)
        status = run(["dvc", "status"], project).stdout
        assert all(f"{st}:" in status for st in ("prepare", "train_vae_warmup", "train_vae_gan", "summary")), status
