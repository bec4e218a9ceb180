rule sample:
    input:
        best="results/{stage}/best.pt",
        data=DATA_FILES,
    output:
        recon=f"results/{{stage}}/samples/vae_recon_grid_{SAMPLE_LABEL}.png",
        generated=f"results/{{stage}}/samples/vae_generated_grid_{SAMPLE_LABEL}.png",
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
        sampling=json.dumps([VF["seed"], VF["sampling"]], sort_keys=True),
    shell:
        "python scripts/sample.py --config {params.config} --checkpoints-root results "
        "--run-name {wildcards.stage} > {log} 2>&1"
