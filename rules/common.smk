# Shared helpers: config validation (before any job is scheduled), stage names,
# inputs and outputs. Paths come from vaeflow.layout, relative to the working directory
# (the repo root). Nothing imported here loads torch: the DAG builds in a fraction of a
# second. Checks that need the model code (model options, LPIPS weights on disk) run at
# the start of every stage command and in `vaeflow validate`.
import json

from snakemake.exceptions import WorkflowError

from vaeflow import config as vfconfig
from vaeflow.dvcsync import sync_mtimes
from vaeflow.layout import RESULTS, Layout
from vaeflow.provenance import code_fingerprint

try:
    VF = vfconfig.validate(config)  # one message naming the key path
except (vfconfig.ConfigError, ValueError) as exc:
    raise WorkflowError(str(exc))
# Stage commands read the config files themselves; --config overrides would not reach them.
if vfconfig.load(workflow.configfiles) != VF:
    raise WorkflowError(
        "--config overrides are not passed to the stage commands (nor to DVC): "
        "put the change in a config file and pass it with --configfile"
    )

# The package's source (vaeflow.provenance): in every rule's params, so a code edit reruns.
CODE = code_fingerprint()
CONFIG_ARGS = " ".join(str(p) for p in workflow.configfiles)
STAGES = vfconfig.stage_names(VF)
LAYOUT = Layout(RESULTS)
STAGE = LAYOUT.stage("{stage}")  # paths of the {stage} wildcard
DATA_FILES = [str(p) for p in LAYOUT.data_files()]
SAMPLE_LABEL = VF["sampling"]["checkpoint"]
# prepare may download (MNIST through torchvision): keep it off compute nodes without internet.
PREPARE_DOWNLOADS = VF["data"]["dataset"] == "mnist" and VF["data"].get(
    "download", True
)

# Evaluation, sampling and plots of a finished stage run beside the next stage's training
# (the critical path) on a machine with few cores: at a lower CPU priority they take the
# cores it leaves idle instead of slowing it (docs/internals.md, "Processes and threads"). Numbers do not change.
BESIDE_TRAINING = "nice -n 19"

# Outputs restored by `dvc pull` get DAG-ordered mtimes, so they count as current.
sync_mtimes()


wildcard_constraints:
    stage="|".join(STAGES),


def raw_data():
    """The raw data folder (data.root), so a `dvc add`-ed dataset feeds prepare."""
    root = VF["data"].get("root")
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


def all_targets():
    out = []
    for stage in STAGES:
        outs = LAYOUT.outputs(stage, SAMPLE_LABEL)
        out += outs["train"] + outs["evaluate"] + outs["sample"] + outs["curves"]
    return out + [str(p) for p in LAYOUT.summary_files()]


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
