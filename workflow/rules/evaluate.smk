# One eval job per (model, task, dataset, method, length, budget): one Parquet row per sample.


rule evaluate:
    input:
        unpack(eval_inputs),
    output:
        "results/raw/{model}/{task}/{dataset}/{method}/L{length}_B{budget}.parquet",
    log:
        "logs/evaluate/{model}/{task}/{dataset}/{method}/L{length}_B{budget}.log",
    conda:
        "../../envs/kvbench.yaml"
    threads: 1
    resources:
        gpu=gpu,
        mem_mb=per_attempt(16000),
        runtime=per_attempt(480),
    params:
        job=job_json,
        profile=profile_flag,
    shell:
        "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=1073741824 "
        "OMP_NUM_THREADS={threads} python -m kvbench eval --job {params.job} --model {input.model} "
        "--data {input.data} {params.profile} --out {output} > {log} 2>&1"
