rule evaluate:
    input:
        best=str(STAGE.best),
        data=DATA_FILES,
    output:
        metrics=report(
            str(STAGE.eval_metrics),
            caption="../workflow/report/metrics.rst",
            category="Evaluation",
            subcategory="{stage}",
            labels={"stage": "{stage}", "file": "metrics.json"},
        ),
    log:
        str(LAYOUT.log("evaluate", "{stage}")),
    benchmark:
        str(LAYOUT.benchmark("evaluate", "{stage}"))
    conda:
        "../envs/vaeflow.yaml"
    threads: 1
    # peak 2.8 GB at CelebA size (benchmarks/bench_eval_memory.py), plus 25 %; runtime from the
    # test split's size (read from the prepared manifest when the job is submitted), and a GPU
    # (gres) when evaluation.device is cuda: vaeflow.trainer.slurm.evaluate_job_resources
    resources:
        **evaluate_gpu(),
        mem_mb=3500,
        runtime=evaluate_runtime,
    params:
        config=CONFIG_ARGS,
        code=CODE,
        evaluation=json.dumps([VF["seed"], VF["evaluation"]], sort_keys=True),
    shell:
        f"{BESIDE_TRAINING} python scripts/evaluate.py --config {{params.config}} --results {RESULTS} "
        "--stage {wildcards.stage} > {log} 2>&1"
