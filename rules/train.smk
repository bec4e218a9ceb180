# One job per entry of training.pipeline.steps; each starts from the previous stage's
# best.pt. Resume state lives in results/{stage}/running/, which is not a declared
# output, so a killed job's rerun (--rerun-incomplete) continues where it stopped.
from vaeflow.trainer.slurm import train_job_resources


rule train:
    input:
        unpack(train_inputs),
    output:
        best="results/{stage}/best.pt",
        last="results/{stage}/last.pt",
        metrics="results/{stage}/metrics.jsonl",
    log:
        "results/logs/train_{stage}.log",
    benchmark:
        "results/benchmarks/train_{stage}.tsv"
    conda:
        "../envs/vaeflow.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0,
        # nnodes > 1: nodes, tasks and the `mpi` resource (vaeflow.trainer.slurm)
        **train_job_resources(VF["training"]["distributed"]["nnodes"]),
    params:
        config=CONFIG_ARGS,
        stage=stage_params,
    shell:
        "python scripts/train.py --config {params.config} --results results "
        "--stage {wildcards.stage} > {log} 2>&1"
