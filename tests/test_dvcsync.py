"""sync_mtimes: outputs DVC vouches for get DAG-ordered mtimes, also downstream of a fix."""

from __future__ import annotations

import os

import yaml

from vaeflow import dvcsync


def test_fixing_a_stage_also_fixes_what_it_inverts_downstream(tmp_path, monkeypatch):
    # dep -> A -> a -> B -> b. After a pull: a is older than dep (inverted); b is newer than a
    # (fine), until a is fixed; then b must be moved after a too (the summary-after-evaluate case).
    for name, t in (("dep", 100), ("a", 50), ("b", 75)):
        (tmp_path / name).write_text(name)
        os.utime(tmp_path / name, (t, t))
    lock = {"stages": {"B": {"deps": [{"path": "a"}], "outs": [{"path": "b"}]},
                       "A": {"deps": [{"path": "dep"}], "outs": [{"path": "a"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    monkeypatch.setattr(dvcsync, "_unchanged_stages", lambda root, names: set(names))
    touched = dvcsync.sync_mtimes(tmp_path)
    mt = {n: (tmp_path / n).stat().st_mtime for n in ("dep", "a", "b")}
    assert mt["dep"] < mt["a"] < mt["b"], mt
    assert [p.name for p in touched] == ["a", "b"]


def test_untrusted_stages_are_left_alone(tmp_path, monkeypatch):
    for name, t in (("dep", 100), ("a", 50)):
        (tmp_path / name).write_text(name)
        os.utime(tmp_path / name, (t, t))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"A": {"deps": [{"path": "dep"}], "outs": [{"path": "a"}]}}}))
    monkeypatch.setattr(dvcsync, "_unchanged_stages", lambda root, names: set())
    assert dvcsync.sync_mtimes(tmp_path) == [] and (tmp_path / "a").stat().st_mtime == 50
