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
        # only best.pt is declared: Snakemake deletes declared outputs before a
        # retry, and last.pt must survive to be resumed from
        "results/{stage}/best.pt",
    wildcard_constraints:
        stage="|".join(STAGES),
    threads: 1
    params:
        last="results/{stage}/last.pt",
        steps=config["steps"],
        step_seconds=config["step_seconds"],
    # gpu, cpus_per_task, mem_mb, runtime come from the profile's set-resources
    script:
        "../scripts/toy_job.py"
