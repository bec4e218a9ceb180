# Shared helpers: config validation (before any job is scheduled), stage names,
# inputs and outputs. Paths come from vaeflow.layout, relative to the working directory
# (the repo root). Nothing imported here loads torch: the DAG builds in a fraction of a
# second. Checks that need the model code (model options, LPIPS weights on disk) run at
# the start of every stage command and in `vaeflow validate`.
import json
import re
import shlex

from snakemake.exceptions import WorkflowError

from vaeflow import config as vfconfig
from vaeflow.dvcsync import sync_mtimes
from vaeflow.layout import RESULTS, Layout
from vaeflow.provenance import code_fingerprint
from vaeflow.sweep import snakemake_runs

# The runs of this invocation (vaeflow.sweep): the config's own (the default run, or a named
# one with `run:`), or every row of a sweep file, each validated before any job starts. Stage
# commands read the config files themselves; --config overrides would not reach them.
try:  # one message naming the key path (and the row)
    SWEEP, RUNS = snakemake_runs(config, workflow.configfiles)
except (vfconfig.ConfigError, ValueError) as exc:
    raise WorkflowError(str(exc))
DEFAULT_RUN = next((r for r in RUNS if r.name is None), None)  # results/ itself
# results/<run>/ (rules/runs.smk)
NAMED = {r.name: r for r in RUNS if r.name is not None}
VF = (DEFAULT_RUN or RUNS[0]).config

# The package's source (vaeflow.provenance): in every rule's params, so a code edit reruns.
CODE = code_fingerprint()


def CONFIG_ARGS(wildcards):
    """The default run's config files (its rules' params); refused when this invocation has none."""
    if DEFAULT_RUN is None:
        raise WorkflowError(
            f"this invocation runs named runs only ({', '.join(NAMED)}): their outputs are under "
            f"{RESULTS}/<run>/, and the default run's need a config without `run:`"
        )
    return DEFAULT_RUN.args


STAGES = vfconfig.stage_names(VF) if DEFAULT_RUN else []
LAYOUT = Layout(RESULTS)
STAGE = LAYOUT.stage("{stage}")  # paths of the {stage} wildcard
DATA_FILES = [str(p) for p in LAYOUT.data_files()]
SAMPLE_LABEL = VF["sampling"]["checkpoint"]
# prepare may download (MNIST through torchvision): keep it off compute nodes without internet.
PREPARE_DOWNLOADS = any(
    r.config["data"]["dataset"] == "mnist" and r.config["data"].get("download", True)
    for r in RUNS
)

# Evaluation, sampling and plots of a finished stage run beside the next stage's training
# (the critical path) on a machine with few cores: at a lower CPU priority they take the
# cores it leaves idle instead of slowing it (docs/internals.md, "Processes and threads"). Numbers do not change.
BESIDE_TRAINING = "nice -n 19"

# Outputs restored by `dvc pull` get DAG-ordered mtimes, so they count as current.
sync_mtimes()


wildcard_constraints:
    stage="|".join(STAGES) or "(?!)",  # no default run: its rules match nothing


def raw_data(cfg=None):
    """The raw data folder (data.root), so a `dvc add`-ed dataset feeds prepare."""
    root = (cfg or VF)["data"].get("root")
    return {"raw": root} if root else {}


def stage_params(wildcards):
    """Everything that determines a stage's result; a change reruns it (params trigger)."""
    return vfconfig.fingerprint(vfconfig.stage_view(VF, wildcards.stage))


def train_inputs(wildcards):
    inputs = {"data": DATA_FILES}
    prior = LAYOUT.prior_checkpoint(STAGES, wildcards.stage)
    if prior is not None:
        inputs["prior"] = str(prior)
    return inputs


def sample_grid(strategy, what):
    """A sample grid of the configured checkpoint, marked for the Snakemake report."""
    return report(
        str(STAGE.sample_file(strategy, SAMPLE_LABEL)),
        caption="../workflow/report/samples.rst",
        category="Samples",
        subcategory="{stage}",
        labels={"stage": "{stage}", "grid": what},
    )


def run_targets(run):
    """Every output of one run: each stage's files, then the run's summary."""
    out = []
    for stage in run.stages:
        outs = run.layout.outputs(stage, run.config["sampling"]["checkpoint"])
        out += outs["train"] + outs["evaluate"] + outs["sample"] + outs["curves"]
    return out + [str(p) for p in run.layout.summary_files()]


def all_targets():
    """Every run's outputs; a sweep's comparison too (rules/runs.smk)."""
    out = [t for r in RUNS for t in run_targets(r)]
    if SWEEP:
        out += [str(p) for p in LAYOUT.compare_files(SWEEP).values()]
    return out


# Named runs (rules/runs.smk): the paths of the {run} and {stage} wildcards, and the job's run.
NAMED_LAYOUT = Layout(RESULTS, run="{run}")  # paths of the {run} and {stage} wildcards
NSTAGE = NAMED_LAYOUT.stage("{stage}")
NAMED_DATA = Layout(RESULTS, run="{run}", data_key="{key}")  # results/data-{key}/
# one run per shared data folder
DATA_RUN = {r.layout.data_key: r for r in NAMED.values()}
NAMED_CONSTRAINTS = {
    "run": "|".join(map(re.escape, NAMED)) or "(?!)",
    "stage": "|".join(sorted({s for r in NAMED.values() for s in r.stages})) or "(?!)",
}
NAMED_NNODES = max(
    [r.config["training"]["distributed"]["nnodes"] for r in NAMED.values()], default=1
)


def named_data_json(key):
    """The data section of the named runs that share results/data-<key>/ (equal in all)."""
    return json.dumps(DATA_RUN[key].config["data"], sort_keys=True)


def named(wildcards):
    return NAMED[wildcards.run]


def named_data_files(wildcards):
    return [str(p) for p in named(wildcards).layout.data_files()]


def named_train_inputs(wildcards):
    run = named(wildcards)
    inputs = {"data": named_data_files(wildcards)}
    prior = run.layout.prior_checkpoint(run.stages, wildcards.stage)
    if prior is not None:
        inputs["prior"] = str(prior)
    return inputs


def named_stage_params(wildcards):
    cfg = named(wildcards).config
    return vfconfig.fingerprint(vfconfig.stage_view(cfg, wildcards.stage))


def named_section(*keys):
    """A params function: these config sections of the job's run (a change reruns the job)."""
    return lambda wildcards: json.dumps(
        [named(wildcards).config[k] for k in keys], sort_keys=True
    )


def named_sample_grid(strategy, what):
    return report(
        str(NSTAGE.sample_file(strategy, "{label}")),
        caption="../workflow/report/samples.rst",
        category="Samples",
        subcategory="{run}: {stage}",
        labels={"run": "{run}", "stage": "{stage}", "grid": what},
    )


def evaluate_runtime(wildcards, attempt):
    """The evaluate rule's SLURM minutes from the test split's size: Snakemake evaluates this
    again when the job is submitted, after prepare wrote the manifest; a retry gets more.
    """
    from vaeflow.trainer.slurm import evaluate_job_resources

    return evaluate_job_resources(VF, DATA_FILES[0], attempt)["runtime"]


def evaluate_gpu():
    """`gres: gpu:1` for the evaluate rule when evaluation.device is cuda, else nothing."""
    from vaeflow.trainer.slurm import evaluate_job_resources

    return {k: v for k, v in evaluate_job_resources(VF).items() if k != "runtime"}


def named_evaluate_runtime(wildcards, attempt):
    """evaluate_runtime for a named run's evaluate job: its own config and prepared data."""
    from vaeflow.trainer.slurm import evaluate_job_resources

    run = named(wildcards)
    manifest = str(run.layout.data_files()[0])
    return evaluate_job_resources(run.config, manifest, attempt)["runtime"]


def named_evaluate_gpu():
    """`gres: gpu:1` for named runs' evaluate jobs when any of them evaluates on cuda."""
    from vaeflow.trainer.slurm import evaluate_job_resources

    res = [evaluate_job_resources(r.config) for r in NAMED.values()]
    return {k: v for r in res for k, v in r.items() if k != "runtime"}
