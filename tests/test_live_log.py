"""logging.tensorboard: live TensorBoard events per stage (vaeflow.trainer.live_log), read back
with TensorBoard's own readers; each logged step exactly once after a SIGKILL and a resume."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from support import copy_prepared, make_project, run
from vaeflow import config as cfg
from vaeflow.layout import Layout


def raw_events(folder: Path) -> list:
    """Every event of every file in folder, in file order (TensorBoard's raw file reader)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [e for path in sorted(folder.glob("events.out.tfevents.*")) for e in EventFileLoader(str(path)).Load()]


def tag_steps(folder: Path) -> Counter:
    """(tag, step) -> how many times the raw files hold it."""
    return Counter((v.tag, e.step) for e in raw_events(folder) if e.HasField("summary") for v in e.summary.value)


def accumulated(folder: Path):
    """What TensorBoard shows: its EventAccumulator over the folder, everything kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def write_steps(folder: Path, steps) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as w:
        for s in steps:
            w.add_scalar("train/x", float(s), s)


def test_cut_events_drops_later_steps_and_a_torn_record(tmp_path):
    from vaeflow.trainer.live_log import cut_events

    write_steps(tmp_path, range(1, 11))
    [path] = tmp_path.glob("events.out.tfevents.*")
    with open(path, "ab") as f:  # a record torn by a kill: length header, no body
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00")
    assert cut_events(tmp_path, 6) == 4
    assert sorted(s for _, s in tag_steps(tmp_path)) == [1, 2, 3, 4, 5, 6]
    before = path.read_bytes()
    assert cut_events(tmp_path, 6) == 0 and path.read_bytes() == before  # nothing left to cut: untouched


def test_tensorboard_true_without_the_package_is_one_config_error(monkeypatch):
    from vaeflow.preflight import check_code_level

    raw = yaml.safe_load((Path(__file__).parent / "configs" / "tiny.yaml").read_text())
    raw["logging"] = {"tensorboard": True}
    config = cfg.validate(raw)
    check_code_level(config)  # installed here: accepted
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(cfg.ConfigError, match=r"logging.tensorboard: true, but the tensorboard package is not installed"):
        check_code_level(config)


def test_tensorboard_is_off_by_default():
    assert cfg.schema_defaults("logging") == {"tensorboard": False}
    # no part of a stage's fingerprint: switching it on reruns nothing and keeps the resume state
    raw = yaml.safe_load((Path(__file__).parent / "configs" / "tiny.yaml").read_text())
    on = cfg.validate({**raw, "logging": {"tensorboard": True}})
    off = cfg.validate(raw)
    assert cfg.stage_view(on, "vae_warmup") == cfg.stage_view(off, "vae_warmup")


TRAIN = ["python", "scripts/train.py", "--config", "config/config.yaml", "--stage", "s"]


def one_stage_project(project: Path, tiny_data: Path, tensorboard: bool) -> Path:
    """One stage of 2 epochs x 6 steps, a log line every step, a resume checkpoint every 4."""
    path = project / "config" / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["training"].update(log_every=1, save_every=4)
    raw["training"]["pipeline"]["steps"] = [{"name": "s", "n_epochs": 2}]
    raw["logging"] = {"tensorboard": tensorboard}
    path.write_text(yaml.safe_dump(raw))
    copy_prepared(tiny_data, project)
    return project


@pytest.mark.slow
def test_events_hold_each_step_once_after_sigkill_and_resume(project, tiny_data):
    one_stage_project(project, tiny_data, tensorboard=True)
    tb = Layout(project / "results").stage("s").tensorboard
    write_steps(tb, [99])  # an earlier training of the stage: a fresh start removes it

    # Killed (SIGKILL, by the stage itself) at step 11: steps 1-10 logged, resume checkpoint at 8.
    res = run(TRAIN, project, check=False, VAEFLOW_FAULT="kill@step:11")
    assert res.returncode == -9, res.stdout[-3000:] + res.stderr[-3000:]
    before = tag_steps(tb)
    assert max(s for _, s in before) == 10 and ("train/x", 99) not in before  # steps 9, 10 are to be cut

    log = run(TRAIN, project).stdout
    assert "Resuming from checkpoint: step=1 (s), epoch=2, batch=2" in log

    counts = tag_steps(tb)
    assert counts and set(counts.values()) == {1}, [k for k, n in counts.items() if n > 1]  # each step once
    steps = lambda tag: sorted(s for t, s in counts if t == tag)  # noqa: E731
    for tag in ("train/vae_loss", "train/kl_loss", "lr/vae", "speed/images_per_s"):
        assert steps(tag) == list(range(1, 13)), tag
    for tag in ("val/val_loss", "samples/original", "samples/reconstruction", "samples/prior"):
        assert steps(tag) == [6, 12], tag

    # The values are metrics.jsonl's (its truncation on resume and the events' cut agree) ...
    records = [json.loads(l) for l in (project / "results" / "s" / "metrics.jsonl").read_text().splitlines()]
    ea = accumulated(tb)
    shown = {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}
    n = 0
    for rec in records:
        for name, value in rec["metrics"].items():
            assert math.isclose(shown[f"{rec['split']}/{name}"][rec["global_step"]], value, rel_tol=1e-6)
            n += 1
    assert n == sum(counts[k] for k in counts if k[0].split("/")[0] in ("train", "val"))
    # ... and TensorBoard's view holds the same steps as the files
    assert {(t, s) for t, vals in shown.items() for s in vals} == {k for k in counts if not k[0].startswith("samples/")}


@pytest.mark.slow
def test_off_imports_nothing_and_writes_nothing(project, tiny_data):
    one_stage_project(project, tiny_data, tensorboard=False)
    tb = Layout(project / "results").stage("s").tensorboard
    write_steps(tb, [99])  # stale events of an earlier training: removed by the fresh start even when off
    code = ("import sys; from vaeflow import config; from vaeflow.trainer import run_stage; "
            "run_stage(config.load('config/config.yaml'), 's', 'results'); "
            "print('imported:', sorted(m for m in sys.modules if m.split('.')[0] == 'tensorboard' "
            "or m == 'torch.utils.tensorboard'))")
    out = run(["python", "-c", code], project).stdout
    assert "imported: []" in out
    assert not tb.exists()


def test_a_rollback_cuts_the_steps_it_replays(tmp_path, tiny_data, monkeypatch):
    """The non-finite guard rolls back in-process (trainer/recovery.py): the replayed steps
    are logged again, once."""
    from vaeflow.trainer import run_stage

    raw = yaml.safe_load((Path(__file__).parent / "configs" / "tiny.yaml").read_text())
    raw["training"].update(log_every=1, save_every=4)
    raw["training"]["pipeline"]["steps"] = [{"name": "s", "n_epochs": 1, "max_steps": 12}]
    raw["logging"] = {"tensorboard": True}
    copy_prepared(tiny_data, tmp_path)
    # steps 1-6 logged, step 7 fails 3 times: back to the step-4 checkpoint, steps 5 and 6 again
    monkeypatch.setenv("VAEFLOW_FAULT", "nan@step:7")
    summary = run_stage(cfg.validate(raw), "s", tmp_path / "results")
    assert summary["rollbacks"] == 1 and summary["global_step"] == 12
    counts = tag_steps(Layout(tmp_path / "results").stage("s").tensorboard)
    assert set(counts.values()) == {1}
    assert sorted(s for t, s in counts if t == "train/vae_loss") == list(range(1, 13))
