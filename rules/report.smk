# Loss curves per stage (from metrics.jsonl) and the evaluation summary across stages;
# `snakemake --report report.html` collects them with the sample grids.
rule curves:
    input:
        metrics=str(STAGE.metrics_log),
    output:
        png=report(
            str(STAGE.curve("png")),
            caption="../workflow/report/curves.rst",
            category="Loss curves",
            labels={"stage": "{stage}"},
        ),
        train=str(STAGE.curve("train")),
        val=str(STAGE.curve("val")),
    log:
        str(LAYOUT.log("curves", "{stage}")),
    benchmark:
        str(LAYOUT.benchmark("curves", "{stage}"))
    conda:
        "../envs/vaeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=CODE,
        run="",  # a named run's: --run NAME (rules/runs.smk)
    shell:
        f"{BESIDE_TRAINING} python scripts/curves.py --results {RESULTS} {{params.run}}"
        "--stage {wildcards.stage} > {log} 2>&1"


rule summary:
    input:
        metrics=[str(LAYOUT.stage(s).eval_metrics) for s in STAGES],
    output:
        csv=report(
            str(LAYOUT.summary_files()[0]),
            caption="../workflow/report/summary.rst",
            category="Evaluation",
            subcategory="All stages",
            labels={"table": "summary (CSV)"},
        ),
        md=str(LAYOUT.summary_files()[1]),
        html=report(
            str(LAYOUT.summary_files()[2]),
            caption="../workflow/report/summary.rst",
            category="Evaluation",
            subcategory="All stages",
            labels={"table": "summary"},
        ),
    log:
        str(LAYOUT.log("summary")),
    benchmark:
        str(LAYOUT.benchmark("summary"))
    conda:
        "../envs/vaeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        config=CONFIG_ARGS,
        code=CODE,
    shell:
        f"python scripts/summary.py --config {{params.config}} --results {RESULTS} > {{log}} 2>&1"
