"""Checkpoints: atomic writes, safe loads, clear errors for bad files."""

from __future__ import annotations

import pytest
import torch

from vaeflow import checkpoint as ckpt


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "best.pt"
    ckpt.save({"format": ckpt.FORMAT, "w": torch.ones(2)}, path)

    def explode(f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(path, explode)
    assert torch.equal(ckpt.load_vaeflow(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temp file left behind


def test_save_also_links_the_same_file_and_a_later_save_replaces_only_its_own_name(tmp_path):
    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    ckpt.save({"format": ckpt.FORMAT, "w": torch.ones(2)}, last)  # an older resume state
    ckpt.save({"format": ckpt.FORMAT, "w": torch.full((2,), 2.0)}, best, also=(last,))
    assert best.read_bytes() == last.read_bytes() and best.stat().st_ino == last.stat().st_ino
    ckpt.save({"format": ckpt.FORMAT, "w": torch.full((2,), 3.0)}, last)
    assert torch.equal(ckpt.load_vaeflow(best)["w"], torch.full((2,), 2.0))  # best untouched
    assert torch.equal(ckpt.load_vaeflow(last)["w"], torch.full((2,), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temp links left


def test_bad_files_give_one_clear_error(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="missing.pt: file not found"):
        ckpt.load(tmp_path / "missing.pt")
    trunc = tmp_path / "trunc.pt"
    ckpt.save({"format": ckpt.FORMAT, "w": torch.randn(1000)}, trunc)
    trunc.write_bytes(trunc.read_bytes()[:200])
    with pytest.raises(ckpt.CheckpointError, match="trunc.pt: cannot be read"):
        ckpt.load(trunc)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ckpt.CheckpointError, match="not a vaeflow checkpoint"):
        ckpt.load_vaeflow(other)


def test_unsafe_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ckpt.CheckpointError, match="cannot be read"):
        ckpt.load(path)
