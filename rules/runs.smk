# Named runs (config key `run`, or the rows of a sweep file): the default run's rules, under
# results/<run>/ (vaeflow.layout); runs whose data sections are equal share one prepared
# results/data-<key>/. Every run's jobs are ordinary jobs of one DAG (on SLURM too), so
# several runs train at the same time. A sweep also gets its comparison (vaeflow compare).
from vaeflow.trainer.slurm import train_job_resources

if PREPARE_DOWNLOADS:

    localrules:
        prepare_run,


# The copy of the prepared data that named runs with equal data sections share. Its command
# gets the data section itself (not a run's config file), so dropping a run reruns nothing.
rule prepare_run:
    input:
        unpack(lambda wildcards: raw_data(DATA_RUN[wildcards.key].config)),
    output:
        manifest=str(NAMED_DATA.data_files()[0]),
        train=str(NAMED_DATA.data_files()[1]),
        val=str(NAMED_DATA.data_files()[2]),
        test=str(NAMED_DATA.data_files()[3]),
    log:
        str(NAMED_DATA.data_log()),
    benchmark:
        str(NAMED_DATA.data_benchmark())
    wildcard_constraints:
        key="|".join(DATA_RUN) or "(?!)",
    conda:
        "../envs/vaeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        data=lambda wildcards: shlex.quote(named_data_json(wildcards.key)),
        code=CODE,
    shell:
        f"python scripts/prepare.py --data {{params.data}} --results {RESULTS} > {{log}} 2>&1"


use rule train as train_run with:
    input:
        unpack(named_train_inputs),
    output:
        best=str(NSTAGE.best),
        last=str(NSTAGE.last),
        metrics=str(NSTAGE.metrics_log),
    log:
        str(NAMED_LAYOUT.log("train", "{stage}")),
    benchmark:
        str(NAMED_LAYOUT.benchmark("train", "{stage}"))
    wildcard_constraints:
        **NAMED_CONSTRAINTS,
    threads: lambda wildcards: vfconfig.stage_cpu_threads(named(wildcards).config, wildcards.stage)
    # one node count for every run of an invocation (vaeflow.sweep.check_runs)
    resources:
        **train_job_resources(NAMED_NNODES),
        mem_mb=8000,
        runtime=240,
        gpu=0,
    params:
        config=lambda wildcards: named(wildcards).args,
        stage=named_stage_params,


use rule evaluate as evaluate_run with:
    input:
        best=str(NSTAGE.best),
        data=named_data_files,
    output:
        metrics=report(
            str(NSTAGE.eval_metrics),
            caption="../workflow/report/metrics.rst",
            category="Evaluation",
            subcategory="{run}: {stage}",
            labels={"run": "{run}", "stage": "{stage}", "file": "metrics.json"},
        ),
    log:
        str(NAMED_LAYOUT.log("evaluate", "{stage}")),
    benchmark:
        str(NAMED_LAYOUT.benchmark("evaluate", "{stage}"))
    wildcard_constraints:
        **NAMED_CONSTRAINTS,
    resources:
        **named_evaluate_gpu(),
        mem_mb=3500,
        runtime=named_evaluate_runtime,
    params:
        config=lambda wildcards: named(wildcards).args,
        evaluation=named_section("seed", "evaluation"),


use rule sample as sample_run with:
    input:
        best=str(NSTAGE.best),
        data=named_data_files,
    output:
        recon=named_sample_grid("reconstruction", "reconstructions"),
        generated=named_sample_grid("random", "random samples"),
        latent_grid=named_sample_grid("latent_grid", "2D latent grid"),
        traversal=named_sample_grid("traversal", "traversals"),
        interpolation=named_sample_grid("interpolation", "interpolations"),
        note=str(NSTAGE.sample_note("{label}")),
    # the checkpoint label ({label}: sampling.checkpoint, per run) names the log too
    log:
        str(NAMED_LAYOUT.log("sample", "{stage}_{label}")),
    benchmark:
        str(NAMED_LAYOUT.benchmark("sample", "{stage}_{label}"))
    wildcard_constraints:
        **NAMED_CONSTRAINTS,
        label="best|last",
    params:
        config=lambda wildcards: named(wildcards).args,
        sampling=named_section("seed", "sampling"),


use rule curves as curves_run with:
    input:
        metrics=str(NSTAGE.metrics_log),
    output:
        png=report(
            str(NSTAGE.curve("png")),
            caption="../workflow/report/curves.rst",
            category="Loss curves",
            subcategory="{run}",
            labels={"run": "{run}", "stage": "{stage}"},
        ),
        train=str(NSTAGE.curve("train")),
        val=str(NSTAGE.curve("val")),
    log:
        str(NAMED_LAYOUT.log("curves", "{stage}")),
    benchmark:
        str(NAMED_LAYOUT.benchmark("curves", "{stage}"))
    wildcard_constraints:
        **NAMED_CONSTRAINTS,
    params:
        run=lambda wildcards: f"--run {wildcards.run} ",


use rule summary as summary_run with:
    input:
        metrics=lambda wildcards: [
            str(named(wildcards).layout.stage(s).eval_metrics)
            for s in named(wildcards).stages
        ],
    output:
        csv=report(
            str(NAMED_LAYOUT.summary_files()[0]),
            caption="../workflow/report/summary.rst",
            category="Evaluation",
            subcategory="{run}: all stages",
            labels={"run": "{run}", "table": "summary (CSV)"},
        ),
        md=str(NAMED_LAYOUT.summary_files()[1]),
        html=report(
            str(NAMED_LAYOUT.summary_files()[2]),
            caption="../workflow/report/summary.rst",
            category="Evaluation",
            subcategory="{run}: all stages",
            labels={"run": "{run}", "table": "summary"},
        ),
    log:
        str(NAMED_LAYOUT.log("summary")),
    benchmark:
        str(NAMED_LAYOUT.benchmark("summary"))
    wildcard_constraints:
        run=NAMED_CONSTRAINTS["run"],
    params:
        config=lambda wildcards: named(wildcards).args,


# A sweep's runs side by side: final metrics per stage, each run's config differences from
# the first row, validation curves overlaid (vaeflow.compare).
COMPARE = LAYOUT.compare_files("{sweep}")  # results/compare/<sweep name>/


rule compare:
    input:
        summaries=[str(p) for r in RUNS for p in r.layout.summary_files()[:1]],
    output:
        csv=report(
            str(COMPARE["csv"]),
            caption="../workflow/report/compare.rst",
            category="Comparison",
            labels={"table": "runs (CSV)"},
        ),
        md=str(COMPARE["md"]),
        html=report(
            str(COMPARE["html"]),
            caption="../workflow/report/compare.rst",
            category="Comparison",
            labels={"table": "runs"},
        ),
        png=report(
            str(COMPARE["png"]),
            caption="../workflow/report/compare.rst",
            category="Comparison",
            labels={"table": "validation curves"},
        ),
    log:
        str(LAYOUT.compare_log("{sweep}")),
    wildcard_constraints:
        sweep=re.escape(SWEEP) if SWEEP else "(?!)",
    conda:
        "../envs/vaeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=CODE,
        runs=" ".join(r.name or "default" for r in RUNS),
    shell:
        f"python scripts/compare.py --results {RESULTS} --name {{wildcards.sweep}} "
        "{params.runs} > {log} 2>&1"
