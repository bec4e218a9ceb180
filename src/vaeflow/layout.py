"""Every path and file name under the results directory, in one place.

    results/
      data/manifest.json, train.npy, val.npy, test.npy        prepare
      <stage>/best.pt, last.pt, metrics.jsonl                  train (published when the stage completes)
      <stage>/running/                                        train's resume state (never a declared output)
      <stage>/samples/recon|gen/<tag>-<grid>.png              train's per-epoch grids
      <stage>/tb/events.out.tfevents.*                         train's TensorBoard events (logging.tensorboard)
      <stage>/eval/metrics.json                               evaluate
      <stage>/samples/vae_*_<label>.png, sampling_<label>.json   sample (label: best | last)
      <stage>/plots/loss_curves.png, train.csv, val.csv       curves
      summary.csv, summary.md, summary.html                   summary
      logs/<rule>[_<stage>].log, benchmarks/<rule>[_<stage>].tsv   Snakemake's job logs and benchmarks

Standard library only: the Snakefile and dvcgen import it without torch. A stage name may
be a Snakemake wildcard (`"{stage}"`); `str()` of a path is what rules and dvc.yaml list.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = "results"  # the default results directory (Snakemake and dvc.yaml use it)

DATA = "data"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


def split_file(split: str) -> str:
    return f"{split}.npy"


def checkpoint_file(label: str) -> str:
    return f"{label}.pt"


DATA_FILES = (MANIFEST, *(split_file(s) for s in SPLITS))
CHECKPOINT_LABELS = ("best", "last")
METRICS_LOG = "metrics.jsonl"
TRAIN_FILES = (*(checkpoint_file(c) for c in CHECKPOINT_LABELS), METRICS_LOG)  # what a completed stage publishes
RUNNING = "running"
SAMPLES = "samples"
TENSORBOARD = "tb"  # never a declared output: a live view, rewritten on resume (trainer/live_log.py)
TRAIN_GRIDS = {"original": "recon", "nr_o": "recon", "gen": "gen"}  # per-epoch grid -> samples/ subfolder
EVAL_METRICS = "eval/metrics.json"
SAMPLE_FILES = {  # sampling strategy -> file name ({label}: best | last)
    "reconstruction": "vae_recon_grid_{label}.png",
    "random": "vae_generated_grid_{label}.png",
    "latent_grid": "vae_latent_grid_{label}.png",
    "traversal": "vae_traversal_{label}.png",
    "interpolation": "vae_interpolation_{label}.png",
}
SAMPLE_NOTE = "sampling_{label}.json"
PLOTS = "plots"
CURVE_FILES = {"png": "loss_curves.png", "train": "train.csv", "val": "val.csv"}
SUMMARY_FILES = ("summary.csv", "summary.md", "summary.html")
LOGS = "logs"
BENCHMARKS = "benchmarks"


class StageLayout:
    """results/<stage>/."""

    def __init__(self, root: str | Path, stage: str):
        self.stage = stage
        self.dir = Path(root) / stage

    def checkpoint(self, label: str = "best") -> Path:
        return self.dir / checkpoint_file(label)

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    @property
    def last(self) -> Path:
        return self.checkpoint("last")

    @property
    def metrics_log(self) -> Path:
        return self.dir / METRICS_LOG

    def train_files(self) -> list[Path]:
        return [self.dir / name for name in TRAIN_FILES]

    @property
    def running(self) -> Path:
        return self.dir / RUNNING

    def work(self, name: str) -> Path:
        """A file of the resume state: running/<name> (name: one of TRAIN_FILES)."""
        return self.running / name

    @property
    def samples(self) -> Path:
        return self.dir / SAMPLES

    @property
    def tensorboard(self) -> Path:
        """TensorBoard's run folder of this stage (logging.tensorboard)."""
        return self.dir / TENSORBOARD

    def train_grid(self, tag: str, grid: str) -> Path:
        return self.samples / TRAIN_GRIDS[grid] / f"{tag}-{grid}.png"

    def sample_file(self, strategy: str, label: str) -> Path:
        return self.samples / SAMPLE_FILES[strategy].format(label=label)

    def sample_note(self, label: str) -> Path:
        return self.samples / SAMPLE_NOTE.format(label=label)

    def sample_files(self, label: str) -> list[Path]:
        """What `vaeflow sample` writes for one checkpoint label: the grids, then the note."""
        return [self.sample_file(s, label) for s in SAMPLE_FILES] + [self.sample_note(label)]

    @property
    def eval_metrics(self) -> Path:
        return self.dir / EVAL_METRICS

    def curve(self, kind: str) -> Path:
        return self.dir / PLOTS / CURVE_FILES[kind]

    def curve_files(self) -> list[Path]:
        return [self.curve(kind) for kind in CURVE_FILES]


class Layout:
    """A results directory."""

    def __init__(self, root: str | Path = RESULTS):
        self.root = Path(root)

    def stage(self, name: str) -> StageLayout:
        return StageLayout(self.root, name)

    @property
    def data(self) -> Path:
        return self.root / DATA

    def data_files(self) -> list[Path]:
        return [self.data / name for name in DATA_FILES]

    def summary_files(self) -> list[Path]:
        return [self.root / name for name in SUMMARY_FILES]

    def log(self, rule: str, stage: str | None = None) -> Path:
        return self.root / LOGS / f"{rule}{'_' + stage if stage else ''}.log"

    def benchmark(self, rule: str, stage: str | None = None) -> Path:
        return self.root / BENCHMARKS / f"{rule}{'_' + stage if stage else ''}.tsv"

    def prior_checkpoint(self, stages: list[str], stage: str) -> Path | None:
        """The checkpoint a stage starts from: the previous stage's best.pt (None for the first)."""
        i = stages.index(stage)
        return None if i == 0 else self.stage(stages[i - 1]).best

    def outputs(self, stage: str, sample_label: str) -> dict[str, list[str]]:
        """Each runner step's declared outputs for one training stage (rules/*.smk, dvc.yaml)."""
        s = self.stage(stage)
        files = {
            "train": s.train_files(),
            "evaluate": [s.eval_metrics],
            "sample": s.sample_files(sample_label),
            "curves": s.curve_files(),
        }
        return {step: [str(p) for p in paths] for step, paths in files.items()}
