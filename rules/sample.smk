rule sample:
    input:
        best="results/{stage}/best.pt",
        data=DATA_FILES,
    output:
        recon=sample_grid("vae_recon_grid", "reconstructions"),
        generated=sample_grid("vae_generated_grid", "random samples"),
        latent_grid=sample_grid("vae_latent_grid", "2D latent grid"),
        traversal=sample_grid("vae_traversal", "traversals"),
        interpolation=sample_grid("vae_interpolation", "interpolations"),
        note=f"results/{{stage}}/samples/sampling_{SAMPLE_LABEL}.json",
    log:
        "results/logs/sample_{stage}.log",
    benchmark:
        "results/benchmarks/sample_{stage}.tsv"
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
        "python scripts/sample.py --config {params.config} --checkpoints-root results "
        "--run-name {wildcards.stage} > {log} 2>&1"
