if PREPARE_DOWNLOADS:

    localrules:
        prepare,


rule prepare:
    input:
        unpack(lambda wildcards: raw_data()),
    output:
        manifest=DATA_FILES[0],
        train=DATA_FILES[1],
        val=DATA_FILES[2],
        test=DATA_FILES[3],
    log:
        str(LAYOUT.log("prepare")),
    benchmark:
        str(LAYOUT.benchmark("prepare"))
    conda:
        "../envs/vaeflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        config=CONFIG_ARGS,
        code=CODE,
        data=vfconfig.fingerprint(VF["data"]),
    shell:
        f"python scripts/prepare.py --config {{params.config}} --results {RESULTS} > {{log}} 2>&1"
