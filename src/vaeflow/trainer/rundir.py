"""How a stage writes, resumes and publishes its files (names: vaeflow.layout).

Work in progress lives in <stage>/running/ (last.pt, best.pt, metrics.jsonl): undeclared
to both runners, so neither deletes it after a kill. When the stage completes, the files
are published to <stage>/.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

from vaeflow import checkpoint as ckpt
from vaeflow.layout import METRICS_LOG, TRAIN_FILES, StageLayout
from vaeflow.trainer.state import TrainState


class RunDir:
    """results/<stage>/; only rank 0 writes."""

    def __init__(self, layout: StageLayout, dist, console):
        self.layout, self.running = layout, layout.running
        self.dist, self.console = dist, console
        self.session_id = datetime.now().strftime("%Y%m%d_%H%M%S")

    def work(self, name: str) -> Path:
        return self.layout.work(name)

    def save(self, name: str, state: dict, also: tuple[str, ...] = ()) -> None:
        """Write work/<name>; the names in `also` become links of the same file."""
        if self.dist.main:
            with self.dist.rank_local("rank 0's checkpoint writing"):
                ckpt.save(state, self.work(name), also=tuple(self.work(n) for n in also))

    def metrics_size(self) -> int:
        """The log's size, made durable first: the checkpoint records it as the resume offset,
        so after a crash the file must hold at least that much."""
        p = self.work(METRICS_LOG)
        if not p.exists():
            return 0
        if self.dist.main:
            ckpt.fsync_path(p)
        return p.stat().st_size

    def write_metrics(self, record: dict) -> dict | None:
        """Append a record (rank 0); returns it as written."""
        if not self.dist.main:
            return None
        self.running.mkdir(parents=True, exist_ok=True)
        record = {"timestamp": datetime.now().isoformat(), "session_id": self.session_id, **record}
        with open(self.work(METRICS_LOG), "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def resume_state(self, fingerprint: str) -> dict | None:
        """The resume checkpoint of this same run, or None (then running/ is cleared)."""
        self.dist.barrier()
        st = self._readable_resume_state(fingerprint)
        if st is None:
            self._drop_running()
        self.dist.barrier()
        return st

    def _readable_resume_state(self, fingerprint: str) -> dict | None:
        last = self.work("last.pt")
        if not last.exists():
            return None
        try:
            st = ckpt.load_vaeflow(last)
        except ckpt.CheckpointError as exc:
            self.console.line(f"WARNING: ignoring unreadable resume state ({exc}); starting the stage over")
            return None
        if st.get("fingerprint") != fingerprint:
            self.console.line("Discarding resume state from an earlier run: the stage's config or prior artifact changed")
            return None
        if not TrainState.keys() <= st.keys():
            self.console.line("Discarding resume state written by an older vaeflow; starting the stage over")
            return None
        return st

    def truncate_metrics(self, size: int, keep: tuple = ()) -> None:
        """Drop metric lines written after a checkpoint: they will be written again. The
        records in `keep` (a rollback's events) are written back after the cut."""
        if self.dist.main:
            with open(self.work(METRICS_LOG), "a+b") as f:
                f.truncate(size)
                f.writelines(json.dumps(record).encode() + b"\n" for record in keep)

    def _drop_running(self) -> None:
        if self.dist.main and self.running.exists():
            shutil.rmtree(self.running)

    def publish(self) -> None:
        """Hard-link the finished files into place, then drop the work dir.

        Links keep running/ whole until every output is in place, so a kill during
        publishing just publishes again on the next run.
        """
        self.dist.barrier()
        if not self.dist.main:
            return
        for name in reversed(TRAIN_FILES):  # best.pt last: it is what the next stage waits for
            ckpt.atomic_link(self.work(name), self.layout.dir / name)
        shutil.rmtree(self.running)
