STAGES = list(config["stages"])


def train_input(wildcards):
    i = STAGES.index(wildcards.stage)
    if i == 0:
        return "results/data/manifest.json"
    return f"results/{STAGES[i - 1]}/best.pt"


rule train:
    input:
        train_input,
    output:
        best="results/{stage}/best.pt",
        last="results/{stage}/last.pt",
    wildcard_constraints:
        stage="|".join(STAGES),
    threads: 1
    params:
        # resume state, like vaeflow's trainer: not a declared output, so
        # Snakemake does not delete it before retrying a killed job
        running="results/{stage}/running",
        steps=config["steps"],
        step_seconds=config["step_seconds"],
    # gpu, cpus_per_task, mem_mb, runtime come from the profile's set-resources
    script:
        "../scripts/toy_job.py"
