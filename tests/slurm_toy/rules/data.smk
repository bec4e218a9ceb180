rule download:
    output:
        "results/raw/source.json",
    script:
        "../scripts/toy_job.py"


rule prepare:
    input:
        "results/raw/source.json",
    output:
        "results/data/manifest.json",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/toy_job.py"
