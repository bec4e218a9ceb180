# Loss curves per stage (from metrics.jsonl) and the evaluation summary across stages;
# `snakemake --report report.html` collects them with the sample grids.
rule curves:
    input:
        metrics="results/{stage}/metrics.jsonl",
    output:
        png=report(
            "results/{stage}/plots/loss_curves.png",
            caption="../workflow/report/curves.rst",
            category="Loss curves",
            labels={"stage": "{stage}"},
        ),
        train="results/{stage}/plots/train.csv",
        val="results/{stage}/plots/val.csv",
    log:
        "results/logs/curves_{stage}.log",
    benchmark:
        "results/benchmarks/curves_{stage}.tsv"
    conda:
        "../envs/vaeflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=CODE,
    shell:
        "python scripts/curves.py --results results --stage {wildcards.stage} > {log} 2>&1"


rule summary:
    input:
        metrics=expand("results/{stage}/eval/metrics.json", stage=STAGES),
    output:
        csv=report(
            SUMMARY_FILES[0],
            caption="../workflow/report/summary.rst",
            category="Evaluation",
            subcategory="All stages",
            labels={"table": "summary (CSV)"},
        ),
        md=SUMMARY_FILES[1],
        html=report(
            SUMMARY_FILES[2],
            caption="../workflow/report/summary.rst",
            category="Evaluation",
            subcategory="All stages",
            labels={"table": "summary"},
        ),
    log:
        "results/logs/summary.log",
    benchmark:
        "results/benchmarks/summary.tsv"
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
        "python scripts/summary.py --config {params.config} --results results > {log} 2>&1"
