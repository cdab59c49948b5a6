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
        type=method_type,
        params=method_params,
        task_params=task_params,
        profile=profile_flag,
        seed=config["seed"],
        device=config["device"],
        dtype=config["dtype"],
        chunk=config["chunk_size"],
        hash=job_hash,
        extrapolate=extrapolate_flag,
    shell:
        "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=1073741824 "
        "OMP_NUM_THREADS={threads} python -m kvbench eval --model {input.model} --model-name {wildcards.model} "
        "--task {wildcards.task} --data {input.data} --dataset {wildcards.dataset} "
        "--method {wildcards.method} --type {params.type} --params-json {params.params} "
        "--task-params-json {params.task_params} --budget {wildcards.budget} --length {wildcards.length} "
        "{params.profile} --seed {params.seed} --device {params.device} --dtype {params.dtype} "
        "--chunk-size {params.chunk} --config-hash {params.hash} {params.extrapolate} --out {output} > {log} 2>&1"
