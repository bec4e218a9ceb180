rule sample:
    input:
        best=str(STAGE.best),
        data=DATA_FILES,
    output:
        recon=sample_grid("reconstruction", "reconstructions"),
        generated=sample_grid("random", "random samples"),
        latent_grid=sample_grid("latent_grid", "2D latent grid"),
        traversal=sample_grid("traversal", "traversals"),
        interpolation=sample_grid("interpolation", "interpolations"),
        note=str(STAGE.sample_note(SAMPLE_LABEL)),
    log:
        str(LAYOUT.log("sample", "{stage}")),
    benchmark:
        str(LAYOUT.benchmark("sample", "{stage}"))
    conda:
        "../envs/vaeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        config=CONFIG_ARGS,
        code=CODE,
        sampling=json.dumps([VF["seed"], VF["sampling"]], sort_keys=True),
    shell:
        f"{BESIDE_TRAINING} python scripts/sample.py --config {{params.config}} --results {RESULTS} "
        "--stage {wildcards.stage} > {log} 2>&1"
