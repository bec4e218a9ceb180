# One job per entry of training.pipeline.steps; each starts from the previous stage's
# best.pt. Resume state lives in results/{stage}/running/, which is not a declared
# output, so a killed job's rerun (--rerun-incomplete) continues where it stopped.
from vaeflow.trainer.slurm import train_job_resources


rule train:
    input:
        unpack(train_inputs),
    output:
        best=str(STAGE.best),
        last=str(STAGE.last),
        metrics=str(STAGE.metrics_log),
    log:
        str(LAYOUT.log("train", "{stage}")),
    benchmark:
        str(LAYOUT.benchmark("train", "{stage}"))
    conda:
        "../envs/vaeflow.yaml"
    threads: lambda wildcards: vfconfig.stage_cpu_threads(VF, wildcards.stage)
    # nnodes > 1 adds nodes, tasks and the `mpi` resource (vaeflow.trainer.slurm)
    resources:
        **train_job_resources(VF["training"]["distributed"]["nnodes"]),
        mem_mb=8000,
        runtime=240,
        gpu=0,
    params:
        config=CONFIG_ARGS,
        code=CODE,
        stage=stage_params,
    shell:
        f"python scripts/train.py --config {{params.config}} --results {RESULTS} "
        "--stage {wildcards.stage} > {log} 2>&1"
