"""Training you can watch: TensorBoard event files per stage (`logging.tensorboard: true`).

Rank 0 writes the stage's folder, `results/<stage>/tb/` (vaeflow.layout,
`StageLayout.tensorboard`), against the stage's `global_step` (the x axis of metrics.jsonl):

    train/<metric>   every training.log_every optimizer steps (the logged means of metrics.jsonl)
    val/<metric>     every epoch
    lr/<optimizer>   with each train point (schedulers and rollback backoffs show)
    speed/images_per_s
    samples/original|reconstruction|prior   the epoch's grids (training.sample_every_epoch)

`tensorboard --logdir results` then shows every stage (and every run under results/) as
its own run, side by side. Each write is flushed: the curves are live.

Resume-safe: the event files hold each step once. A resume (or a rollback of the
non-finite guard) restarts from a checkpoint at step G; the events logged after G are
logged again, so they are first cut from the files (each file rewritten atomically, so a
kill while cutting just cuts again on the next start), and the new writer starts with
TensorBoard's purge marker at G + 1, so a TensorBoard already showing the cut steps
drops them too. A fresh start of a stage removes the folder: its events belonged to an
earlier training of the stage.

Off (the default), nothing is imported and nothing is written; the calls return at once.
The `tensorboard` package is an optional extra (`pip install 'vaeflow[tensorboard]'`);
`vaeflow.preflight` refuses `logging.tensorboard: true` without it, before training starts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vaeflow.layout import StageLayout

EVENT_FILES = "events.out.tfevents.*"
GRID_TAGS = {"original": "samples/original", "nr_o": "samples/reconstruction", "gen": "samples/prior"}
GRID_COLUMNS = 5  # as the PNG grids of trainer/validation.py


def cut_events(folder: Path, last_step: int) -> int:
    """Drop the events after `last_step` from every event file in folder (and a record torn by
    a kill); returns how many were dropped. Files with nothing to drop are left as they are."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    from vaeflow.checkpoint import atomic_write

    dropped = 0
    for path in sorted(folder.glob(EVENT_FILES)):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [r for r in records if Event.FromString(r).step <= last_step]
        whole = sum(len(r) + 16 for r in records) == path.stat().st_size  # TFRecord: 12 + data + 4 bytes
        if len(kept) == len(records) and whole:
            continue
        dropped += len(records) - len(kept)

        def write(f, kept=kept):
            w = RecordWriter(f)
            for r in kept:
                w.write(r)

        atomic_write(path, write)
    return dropped


class LiveLog:
    """The TensorBoard writer of one stage; every method is a no-op when off or not rank 0."""

    def __init__(self, enabled: bool, layout: StageLayout, main: bool = True, optimizers=None):
        self.on = enabled and main
        self.main = main
        self.folder = layout.tensorboard
        self.optimizers = optimizers  # trainer/build.Optimizers: named() -> (name, optimizer or None)
        self.writer = None

    @classmethod
    def for_stage(cls, config: dict, layout: StageLayout, dist, optimizers) -> LiveLog:
        return cls(config["logging"]["tensorboard"], layout, dist.main, optimizers)

    def open(self, resumed_step: int | None) -> None:
        """Start writing: a fresh stage (None) or one resumed from a checkpoint at that step."""
        if not self.main:
            return
        self.close()
        if resumed_step is None:
            if self.folder.exists():  # events of an earlier training of this stage (also when off)
                shutil.rmtree(self.folder)
        elif self.on and self.folder.exists():
            cut_events(self.folder, resumed_step)
        if not self.on:
            return
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resumed_step is None else resumed_step + 1
        self.writer = SummaryWriter(str(self.folder), purge_step=purge)

    def scalars(self, split: str, values: dict, step: int, images_per_s: float | None = None) -> None:
        """A metrics.jsonl record's values as `<split>/<metric>`; a train record adds the
        learning rates and the speed."""
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)
        if split == "train":
            for name, opt in self.optimizers.named() if self.optimizers is not None else ():
                if opt is not None:
                    self.writer.add_scalar(f"lr/{name}", opt.param_groups[0]["lr"], step)
            if images_per_s is not None:
                self.writer.add_scalar("speed/images_per_s", images_per_s, step)
        self.writer.flush()

    def grids(self, tiles: dict, step: int) -> None:
        """The epoch's grids (name -> [N, C, H, W] tiles in [0, 1], trainer/validation.save_grids)."""
        if self.writer is None or not tiles:
            return
        from vaeflow.grid import make_grid

        for name, imgs in tiles.items():
            self.writer.add_image(GRID_TAGS.get(name, f"samples/{name}"), make_grid(imgs.float(), nrow=GRID_COLUMNS), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
