rule sample:
    input:
        best="results/{stage}/best.pt",
        data=DATA_FILES,
    output:
        recon="results/{stage}/samples/vae_recon_grid_" + SAMPLE_LABEL + ".png",
        generated="results/{stage}/samples/vae_generated_grid_" + SAMPLE_LABEL + ".png",
    params:
        config=CONFIG_ARGS,
        sampling=json.dumps([VF["seed"], VF["sampling"]], sort_keys=True),
    log:
        "results/logs/sample_{stage}.log",
    benchmark:
        "results/benchmarks/sample_{stage}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/vaeflow.yaml"
    shell:
        "python scripts/sample.py --config {params.config} --checkpoints-root results "
        "--run-name {wildcards.stage} > {log} 2>&1"
