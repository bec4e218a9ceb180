rule evaluate:
    input:
        best="results/{stage}/best.pt",
        data=DATA_FILES,
    output:
        metrics=report(
            "results/{stage}/eval/metrics.json",
            caption="../workflow/report/metrics.rst",
            category="Evaluation",
            subcategory="{stage}",
            labels={"stage": "{stage}", "file": "metrics.json"},
        ),
    log:
        "results/logs/evaluate_{stage}.log",
    benchmark:
        "results/benchmarks/evaluate_{stage}.tsv"
    conda:
        "../envs/vaeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        config=CONFIG_ARGS,
        code=CODE,
        evaluation=json.dumps([VF["seed"], VF["evaluation"]], sort_keys=True),
    shell:
        "python scripts/evaluate.py --config {params.config} --results results "
        "--stage {wildcards.stage} > {log} 2>&1"
