"""Docs that cannot drift: what README.md, docs/*.md, CONTRIBUTING.md and the config comments
name is checked against the code (tests/test_docs.py runs it).

- config key paths (`data.split.val`, `training.pipeline.steps[1].disc_start`, YAML blocks
  whose top-level keys are config sections) exist in the schema
  (src/vaeflow/resources/config.schema.yaml); `model.<option>` is an option of some model type;
- `vaeflow <command> --flag` (also `python scripts/<command>.py`, `python -m vaeflow.cli`) names
  a real command and its real flags (the argparse parser of src/vaeflow/cli.py);
- repository paths (`rules/train.smk`, `config/*.yaml`, links) exist; `#anchors` are headings;
- a README section cited anywhere (README "Resume and faults") is a heading of README.md;
- config comments quote no measurement (dB, %, seconds): docs/benchmarks.md owns those;
- a sentence that says a dataset is downloaded names only datasets that download.

What counts as a name: backticked spans and fenced code blocks in Markdown (prose is never
guessed at), and in YAML comments, schema descriptions and Python also bare dotted key paths.
Each finding is "file:line: what: the name (why)".
"""

from __future__ import annotations

import argparse
import fnmatch
import inspect
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO / "src" / "vaeflow" / "resources" / "config.schema.yaml"

# Paths under these prefixes are made by runs or live outside the repository: not checked.
GENERATED = ("results/", "data/", ".snakemake/", ".venv/", ".dvc/cache", "exported/", "out/", "report.html",
             "dvc.lock", "build/", "dist/")
REPO_SUFFIXES = (".py", ".md", ".smk", ".yaml", ".yml", ".toml", ".cff", ".txt", ".sh", ".rst", ".cfg", ".ini")
# Datasets the data layer can download (vaeflow.data.sources: only MNIST, through torchvision).
DOWNLOADING_DATASETS = {"mnist"}


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    what: str
    name: str
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}: {self.name} ({self.why})"


# -- the code's truth -----------------------------------------------------------------------

def load_schema(path: Path = SCHEMA_PATH) -> dict:
    return yaml.safe_load(path.read_text())


def _deref(node: dict, schema: dict) -> dict:
    while isinstance(node, dict) and "$ref" in node:
        name = node["$ref"].split("/")[-1]
        node = {**schema["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}
    if isinstance(node, dict) and "allOf" in node:
        merged: dict = {"properties": {}}
        for part in node["allOf"]:
            part = _deref(part, schema)
            merged["properties"].update(part.get("properties", {}))
            for k, v in part.items():
                if k != "properties":
                    merged.setdefault(k, v)
        return merged
    return node


def _children(node: dict, schema: dict) -> dict | None:
    """Property name -> schema node; None where any key is allowed (model options, maps)."""
    node = _deref(node, schema)
    if node.get("type") == "array" or "items" in node:
        return _children(node.get("items", {}), schema)
    if "properties" in node:
        return node["properties"]
    return None


@lru_cache(maxsize=1)
def model_options() -> frozenset[str]:
    """Every option some model type's builder accepts (unknown ones are rejected at validate)."""
    from vaeflow.models import MODEL_REGISTRY, get_model_class

    names = {"type"}
    for type_name in MODEL_REGISTRY:
        target = get_model_class(type_name)
        fns = [target] + [base.__init__ for base in getattr(target, "__mro__", ())
                          if base.__module__.startswith("vaeflow.models") and "__init__" in vars(base)]
        for fn in fns:
            names |= {p.name for p in inspect.signature(fn).parameters.values()
                      if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
    from vaeflow.models.vqvae import VQVAE  # magvit takes VQVAE's options as well

    names |= set(inspect.signature(VQVAE.__init__).parameters) - {"self"}
    return frozenset(names)


# Property names too generic to start a relative key path: `vae.config.scaling_factor` is
# diffusers' API, not `optimizers.vae`.
RELATIVE_SKIP = frozenset({"vae", "type", "name", "mode", "metric", "device", "format"})


@lru_cache(maxsize=1)
def model_attributes() -> frozenset[str]:
    """Attributes of the model classes (methods, properties): `model.encode` is Python, not a key."""
    from vaeflow.models import MODEL_REGISTRY, get_model_class

    names: set[str] = set()
    for type_name in MODEL_REGISTRY:
        target = get_model_class(type_name)
        for cls in getattr(target, "__mro__", ()):
            names |= set(vars(cls))
    import torch

    return frozenset(names | set(dir(torch.nn.Module)))


class Schema:
    def __init__(self, schema: dict):
        self.schema = schema
        self.root = schema["properties"]
        # every property name anywhere -> the nodes that have it (for paths relative to a section)
        self.owners: dict[str, list[dict]] = {}
        self._index(schema, seen=set())

    def _index(self, node, seen):
        if not isinstance(node, dict) or id(node) in seen:
            return
        seen.add(id(node))
        props = _children(node, self.schema) if isinstance(node, dict) else None
        if props:
            for name, child in props.items():
                self.owners.setdefault(name, []).append(props)
                self._index(child, seen)
        for key in ("$defs",):
            for child in node.get(key, {}).values():
                self._index(child, seen)

    def _resolve(self, props: dict | None, parts: list[str]) -> str | None:
        """None when parts resolve under props, else the first part that does not."""
        for i, part in enumerate(parts):
            if props is None:  # free-form below here (model options are checked separately)
                return None
            if part == "*":
                return None
            if part not in props:
                return part
            props = _children(props[part], self.schema)
        return None

    def check(self, path: str) -> str | None:
        """None if the dotted path names a config key (or is not a config path at all), else why not."""
        parts = path.split(".")
        first = parts[0]
        if first == "model" and len(parts) >= 2:
            if parts[1] in model_options() or parts[1] == "*" or parts[1] in model_attributes():
                return None  # an option, or the Python API (`model.encode`, `model.latent_shape`)
            return f"`{parts[1]}` is not an option of any model type (vaeflow.models)"
        if first in self.root:
            bad = self._resolve(self.root, parts)
            return None if bad is None else f"no key `{bad}` there in {SCHEMA_PATH.relative_to(REPO)}"
        if first in self.owners and first not in RELATIVE_SKIP:  # relative: `split.val`, `optimization.optimizers.vae.lr`
            errors = [self._resolve(props, parts) for props in self.owners[first]]
            if any(e is None for e in errors):
                return None
            return f"no key `{errors[0]}` under `{first}` in {SCHEMA_PATH.relative_to(REPO)}"
        return None  # not a config path (a module, a file, a metrics.json field)

    def looks_like_config(self, path: str) -> bool:
        first = path.split(".")[0]
        if first in RELATIVE_SKIP:
            return False
        return first in self.root or first in self.owners

    def check_yaml(self, data, props: dict | None = None, prefix: str = "") -> list[tuple[str, str]]:
        """(key path, why) for every key of a YAML config fragment that the schema lacks."""
        props = self.root if props is None and not prefix else props
        out = []
        if isinstance(data, list):
            for item in data:
                out += self.check_yaml(item, props, prefix)
            return out
        if not isinstance(data, dict):
            return out
        for key, value in data.items():
            path = f"{prefix}{key}"
            if prefix == "model.":
                if key not in model_options():
                    out.append((path, "not an option of any model type (vaeflow.models)"))
                continue
            if props is None:
                continue
            if key not in props:
                out.append((path, f"not in {SCHEMA_PATH.relative_to(REPO)}"))
                continue
            child = props[key]
            if path == "model":
                out += self.check_yaml(value, None, "model.")
            else:
                out += self.check_yaml(value, _children(child, self.schema), path + ".")
        return out


class Cli:
    """The `vaeflow` parser: commands, and the flags each accepts."""

    def __init__(self, parser: argparse.ArgumentParser | None = None):
        if parser is None:
            from vaeflow.cli import build_parser

            parser = build_parser()
        self.top = {s for a in parser._actions for s in a.option_strings}
        self.commands: dict[str, set[str]] = {}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sp in action.choices.items():
                    self.commands[name] = {s for a in sp._actions for s in a.option_strings}

    def check(self, command: str, flags: list[str]) -> list[str]:
        if command not in self.commands:
            return [f"`vaeflow {command}`: no such command (vaeflow --help lists {', '.join(sorted(self.commands))})"]
        return [f"`vaeflow {command} {flag}`: no such flag" for flag in flags if flag not in self.commands[command]]


@lru_cache(maxsize=1)
def repo_files() -> tuple[str, ...]:
    res = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return tuple(res.stdout.split())


def path_exists(name: str) -> bool:
    """A repository path (globs and <placeholders> allowed); package-relative module paths
    (`trainer/stage.py`, CONTRIBUTING's style) and bare file names are looked up too."""
    pattern = re.sub(r"<[^>]*>|\{[^}]*\}", "*", name).rstrip("/")
    files = repo_files()
    dirs = {str(Path(f).parent) for f in files} | {str(p) for f in files for p in Path(f).parents}
    for candidate in (pattern, f"src/vaeflow/{pattern}", f"src/{pattern}"):
        if any(ch in candidate for ch in "*?["):
            if fnmatch.filter(files, candidate) or fnmatch.filter(dirs, candidate):
                return True
        elif candidate in files or candidate in dirs or (REPO / candidate).exists():
            return True
    if "/" not in pattern:
        return any(Path(f).name == pattern for f in files)
    return False


# -- reading the docs --------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
KEY_PATH = re.compile(r"^[a-z_][a-z0-9_]*(?:\[[^\]]*\])?(?:\.(?:[a-z_][a-z0-9_]*|<[^>]+>|\*|\d+)(?:\[[^\]]*\])?)+$")
BARE_KEY_PATH = re.compile(r"(?<![\w./$-])([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)(?![\w/(-])")
README_CITE = re.compile(r"README(?:\.md)?[,:]?\s+(?:section\s+)?[\"'\u201c]([^\"'\u201d\n]+)[\"'\u201d]")
# a command at the start of a line or span (after a prompt, env assignments, nice), or after && ; |
COMMAND = re.compile(r"(?:^\s*(?:[$+]\s+)?(?:[A-Z_]+=\S*\s+)*(?:nice -n \d+\s+|time\s+)?|(?:&&|;|\||\$\()\s*(?:[A-Z_]+=\S*\s+)*)"
                     r"(?:vaeflow|python3? -m vaeflow\.cli|python3? (scripts/[a-z_]+)\.py)(?=\s|$)(.*)")
MEASUREMENT = re.compile(r"\b\d+(?:[.,]\d+)?\s?(?:(?:dB|ms|s|min)\b|%)")
NEGATION = re.compile(r"\b(?:no|not|never|nothing|without|cannot|only|offline|isn't|doesn't)\b", re.I)
DATASETS = ("digits", "mnist", "celeba", "image_dir", "ct")


@dataclass
class Doc:
    file: str
    text: str
    kind: str  # "md", "yaml-comments", "schema", "code"


def doc_sources() -> list[Doc]:
    docs = []
    for path in [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]:
        if path.exists():
            docs.append(Doc(str(path.relative_to(REPO)), path.read_text(), "md"))
    for path in sorted((REPO / "config").glob("*.yaml")):
        if path.is_symlink():
            continue
        # comments only (the values are checked by validating the config itself)
        lines = [(line.split("#", 1)[1] if "#" in line else "") for line in path.read_text().splitlines()]
        docs.append(Doc(str(path.relative_to(REPO)), "\n".join(lines), "yaml-comments"))
    # the examples of `vaeflow --help` (its epilog) name commands and flags
    from vaeflow.cli import EPILOG

    docs.append(Doc("src/vaeflow/cli.py (EPILOG)", "```\n" + EPILOG + "\n```", "md"))
    # the schema's descriptions name keys and files too
    docs.append(Doc(str(SCHEMA_PATH.relative_to(REPO)), SCHEMA_PATH.read_text(), "schema"))
    return docs


def citation_sources() -> list[Doc]:
    """Everything that may cite a README section: code, rules, configs, tests, benchmarks."""
    out = []
    for f in repo_files():
        if f.endswith((".py", ".smk", ".yaml", ".toml", ".md", ".cfg", ".sh")) or f.endswith("Snakefile"):
            path = REPO / f
            if f in ("tests/doccheck.py", "tests/test_docs.py"):  # they hold examples of drift on purpose
                continue
            if path.is_file() and not path.is_symlink():
                out.append(Doc(f, path.read_text(errors="replace"), "code"))
    return out


def headings(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)]


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    h = re.sub(r"[`*_]", "", heading.strip().lower())
    h = re.sub(r"[^\w\- ]", "", h)
    return h.replace(" ", "-")


def code_regions(text: str):
    """(line number, text, language or None for inline code) of every code span and block line."""
    in_block, lang = False, None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            in_block, lang = (not in_block), (m.group(2) or "") if not in_block else None
            continue
        if in_block:
            yield n, line, lang
        else:
            for span in INLINE.findall(line):
                yield n, span, None


def fenced_blocks(text: str):
    """(first line number, language, body) of every fenced block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            lang, start, body = m.group(2), i + 2, []
            i += 1
            while i < len(lines) and not FENCE.match(lines[i]):
                body.append(lines[i])
                i += 1
            yield start, lang, "\n".join(body)
        i += 1


# -- the checks -------------------------------------------------------------------------------

def _normalize_key(span: str) -> str | None:
    span = span.strip().rstrip(".,;:")
    span = re.split(r"\s*[:=]\s*|\s", span, maxsplit=1)[0]
    if not KEY_PATH.match(span):
        return None
    span = re.sub(r"\[[^\]]*\]", "", span)
    return ".".join("*" if p.startswith("<") or p.isdigit() else p for p in span.split("."))


@lru_cache(maxsize=1)
def _roots() -> tuple[frozenset[str], frozenset[str]]:
    """First path components that are the repository's (top level) and the package's (src/vaeflow)."""
    files = repo_files()
    top = frozenset(f.split("/")[0] for f in files)
    pkg = frozenset(f.split("/")[2] for f in files if f.startswith("src/vaeflow/") and f.count("/") >= 2)
    return top, pkg


def _looks_like_path(span: str) -> str | None:
    """The repository path a code span names, or None. Only spans that start with a top-level
    entry of the repository (`rules/train.smk`, `README.md`) count, and package-relative module
    paths (`trainer/stage.py`, `models/`); output paths (results/..., running/, eval/metrics.json),
    dataset files and other programs' files are not the repository's."""
    span = span.strip().strip("\"'").split("::")[0].rstrip(".,;:)")
    if not span or " " in span or "=" in span or span.startswith(GENERATED) or span.startswith(("$", "~", "/", "..")):
        return None
    if not re.fullmatch(r"[\w./*<>{}+-]+", span):
        return None
    top, pkg = _roots()
    first = span.split("/")[0]
    if first in top and ("/" in span or "." in span):
        return span
    if first in pkg and (span.endswith(".py") or (span.endswith("/") and span.count("/") == 1)):
        return span
    return None


def check_keys(doc: Doc, schema: Schema) -> list[Finding]:
    out = []
    if doc.kind == "md":
        candidates = [(n, s) for n, s, lang in code_regions(doc.text) if lang is None]
        for start, lang, body in fenced_blocks(doc.text):
            if lang in ("yaml", "yml"):
                try:
                    data = yaml.safe_load(body)
                except yaml.YAMLError:
                    continue
                if isinstance(data, dict) and data and set(data) <= set(schema.root):
                    for path, why in schema.check_yaml(data):
                        line = start + next((i for i, ln in enumerate(body.splitlines())
                                             if re.search(rf"(?<![\w.]){re.escape(path.split('.')[-1])}\s*:", ln)), 0)
                        out.append(Finding(doc.file, line, "config key in a YAML block", path, why))
    else:
        candidates = [(n, m) for n, line in enumerate(doc.text.splitlines(), 1)
                      for m in INLINE.findall(line) + BARE_KEY_PATH.findall(line)]
    for n, span in candidates:
        key = _normalize_key(span)
        if key and schema.looks_like_config(key):
            why = schema.check(key)
            if why:
                out.append(Finding(doc.file, n, "config key", key, why))
    return out


def _command_lines(text: str):
    """(line number, command line) with backslash continuations joined, from code only."""
    regions = list(code_regions(text))
    i = 0
    while i < len(regions):
        n, line, lang = regions[i]
        while lang is not None and line.rstrip().endswith("\\") and i + 1 < len(regions):
            i += 1
            line = line.rstrip()[:-1] + " " + regions[i][1]
        yield n, line
        i += 1


def check_commands(doc: Doc, cli: Cli) -> list[Finding]:
    out = []
    for n, line in _command_lines(doc.text):
        for m in COMMAND.finditer(line):
            script, rest = m.group(1), m.group(2)
            rest = re.split(r"\s(?:\||&&|;|#|\|\||>|2>)", " " + rest)[0]
            tokens = [t.strip("[](){}'\",") for t in rest.split()]
            if script:
                command = Path(script).name.replace("_", "-")
            else:
                if not tokens or not re.fullmatch(r"[a-z][a-z-]*", tokens[0]):
                    continue  # `vaeflow` alone, vaeflow.cli, "vaeflow: error", "vaeflow 0.1.0"
                command, tokens = tokens[0], tokens[1:]
            if command.startswith("-"):
                continue
            flags = [t.split("=")[0] for t in tokens if t.startswith("--") and len(t) > 2]
            if command == "--version":
                continue
            for why in cli.check(command, [f for f in flags if f not in cli.top]):
                out.append(Finding(doc.file, n, "vaeflow command", line.strip()[:80], why))
    return out


def check_paths(doc: Doc) -> list[Finding]:
    out = []
    base = (REPO / doc.file).parent
    if doc.kind == "md":
        spans = [(n, s) for n, s, lang in code_regions(doc.text) if lang is None]
    else:
        spans = [(n, s) for n, line in enumerate(doc.text.splitlines(), 1) for s in INLINE.findall(line)]
        spans += [(n, m) for n, line in enumerate(doc.text.splitlines(), 1)
                  for m in re.findall(r"(?<![\w$/.-])((?:config|docs|rules|scripts|src|tests|benchmarks|profiles|workflow|requirements|envs)/[\w./*<>{}-]+)", line)]
    for n, span in spans:
        path = _looks_like_path(span)
        if path and not path_exists(path.rstrip(".,;:)")):
            out.append(Finding(doc.file, n, "repository path", path, "no such file or folder in the repository"))
    if doc.kind == "md":
        for n, line in enumerate(doc.text.splitlines(), 1):
            for target in LINK.findall(line):
                if target.startswith(("http://", "https://", "mailto:")):
                    continue
                file, _, frag = target.partition("#")
                target_path = (base / file).resolve() if file else REPO / doc.file
                if file and not target_path.exists():
                    out.append(Finding(doc.file, n, "link", target, "no such file"))
                    continue
                if frag and target_path.suffix == ".md":
                    anchors = {anchor(h) for h in headings(target_path.read_text())}
                    if frag not in anchors:
                        out.append(Finding(doc.file, n, "link", target, f"no heading with anchor #{frag} in {target_path.relative_to(REPO)}"))
    return out


def check_readme_citations(doc: Doc, readme_headings: list[str]) -> list[Finding]:
    out = []
    lowered = [h.lower() for h in readme_headings]
    for n, line in enumerate(doc.text.splitlines(), 1):
        for section in README_CITE.findall(line):
            s = section.strip().lower()
            if not any(h == s or h.startswith(s) for h in lowered):
                out.append(Finding(doc.file, n, "README section", f'"{section}"',
                                   "README.md has no such heading; cite one that exists or the doc that owns it"))
    return out


def check_measurements(doc: Doc) -> list[Finding]:
    if doc.kind != "yaml-comments":
        return []
    return [Finding(doc.file, n, "measurement in a config comment", m.group(0),
                    "config comments cite docs/benchmarks.md instead of quoting numbers that drift")
            for n, line in enumerate(doc.text.splitlines(), 1) for m in MEASUREMENT.finditer(line)]


def check_download_claims(doc: Doc) -> list[Finding]:
    """Sentences (across line breaks) that say something is downloaded, and name a dataset
    that prepare cannot download, unless the sentence negates it ("no download")."""
    out = []
    lines = doc.text.splitlines()
    if doc.kind not in ("md", "yaml-comments"):
        return out
    units: list[list[tuple[int, str]]] = []  # paragraphs; a table row, list item or heading starts its own
    in_block = False
    for n, line in enumerate(lines, 1):
        if FENCE.match(line):
            in_block = not in_block
            units.append([])
            continue
        if in_block or not line.strip():
            units.append([])
        elif re.match(r"\s*(?:\||[-*] |#|\d+\. )", line) or not units:
            units.append([(n, line)])
        else:
            units[-1].append((n, line))
    for paragraph in units:
        if not paragraph:
            continue
        text = " ".join(t for _, t in paragraph)
        for sentence in re.split(r"(?<=[.;])\s", text):
            if not re.search(r"download", sentence, re.I) or NEGATION.search(sentence):
                continue
            for d in DATASETS:
                if d in DOWNLOADING_DATASETS or not re.search(rf"\b{d}\b", sentence, re.I):
                    continue
                where = next((k for k, t in paragraph if re.search(rf"\b{d}\b", t, re.I)), paragraph[0][0])
                out.append(Finding(doc.file, where, "download claim", d,
                                   f"only {', '.join(sorted(DOWNLOADING_DATASETS))} can be downloaded by prepare"))
    return out


def check_all(docs: list[Doc] | None = None, schema: dict | None = None, cli: Cli | None = None,
              citations: list[Doc] | None = None, readme: str | None = None) -> list[Finding]:
    docs = doc_sources() if docs is None else docs
    s = Schema(load_schema() if schema is None else schema)
    cli = Cli() if cli is None else cli
    readme_headings = headings((REPO / "README.md").read_text() if readme is None else readme)
    out: list[Finding] = []
    for doc in docs:
        out += check_keys(doc, s) + check_commands(doc, cli) + check_paths(doc)
        out += check_measurements(doc) + check_download_claims(doc)
    for doc in (citation_sources() if citations is None else citations):
        out += check_readme_citations(doc, readme_headings)
    return out
