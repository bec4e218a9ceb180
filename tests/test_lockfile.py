"""requirements/lock.txt: exact pins with hashes that still satisfy pyproject.toml.

Fails when a dependency is added to or narrowed in pyproject.toml without regenerating
the lock (the command is in the lock's header and docs/internals.md), and when a locked
package needs something the lock does not pin.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from support import REPO

LOCK = REPO / "requirements" / "lock.txt"


def locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) for the entries whose markers hold in this environment."""
    out: dict[str, tuple[str, list[str]]] = {}
    text = LOCK.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, *hashes = re.split(r"\s+--hash=", line)
        req = Requirement(spec.strip())
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"not an exact pin: {spec}"
        assert hashes and all(h.startswith("sha256:") for h in hashes), f"no sha256 hashes for {req.name}"
        if req.marker is None or req.marker.evaluate():
            out[canonicalize_name(req.name)] = (next(iter(req.specifier)).version, hashes)
    return out


def satisfied(req: Requirement, pins: dict, extra: str = "") -> str | None:
    """None when the lock satisfies req (or req does not apply here), else why not."""
    if req.marker is not None and not req.marker.evaluate({**default_environment(), "extra": extra}):
        return None
    name = canonicalize_name(req.name)
    if name not in pins:
        return f"{req} is not in {LOCK.name}"
    if not req.specifier.contains(pins[name][0], prereleases=True):
        return f"{req} but {LOCK.name} pins {name}=={pins[name][0]}"
    return None


def test_lock_satisfies_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = locked()
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("test", "slurm", "tensorboard"):
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    problems = [p for r in reqs if (p := satisfied(r, pins))]
    assert not problems, "regenerate requirements/lock.txt (docs/internals.md: 'The lockfile'):\n" + "\n".join(problems)
    assert pins["torch"][0] == "2.14.1" and pins["torchvision"][0] == "0.29.1"


def test_lock_is_closed_under_dependencies():
    """Every locked package's own requirements (as installed here) are pinned too."""
    pins = locked()
    problems, checked = [], 0
    for name, (version, _) in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if canonicalize_name(dist.version) != canonicalize_name(version):
            continue  # this environment was not installed from the lock
        checked += 1
        problems += [f"{name}: {p}" for r in dist.requires or [] if (p := satisfied(Requirement(r), pins))]
    assert checked > 100, "too few locked packages installed at their locked version to check"
    assert not problems, "\n".join(problems)


def test_constraints_agree_with_the_lock():
    """constraints.txt (the conda env's pins) may not contradict the lock."""
    pins = locked()
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert satisfied(req, pins) is None, line
