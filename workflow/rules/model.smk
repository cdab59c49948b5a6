# Model and data: build (or download) each model once; build each dataset at each length.


rule build_model:
    output:
        directory("resources/models/{model}"),
    log:
        "logs/build_model/{model}.log",
    conda:
        "../../envs/kvbench.yaml"
    threads: 2
    resources:
        gpu=gpu,
        mem_mb=per_attempt(8000),
        runtime=per_attempt(120),
    params:
        source=model_source,
        steps=steps_flag,
        seed=config["seed"],
        train=train_flag,
    shell:
        "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000 "
        "MALLOC_TOP_PAD_=1073741824 OMP_NUM_THREADS={threads} "
        "python -m kvbench build-model {params.source} --out {output} --seed {params.seed} "
        "{params.steps} {params.train} > {log} 2>&1"


rule make_data:
    input:
        model="resources/models/{model}",
    output:
        "resources/data/{model}/{dataset}/L{length}.jsonl",
    log:
        "logs/make_data/{model}/{dataset}/L{length}.log",
    conda:
        "../../envs/kvbench.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(30),
    params:
        dataset=dataset_json,
        extrapolate=extrapolate_flag,
        seed=config["seed"],
    shell:
        "python -m kvbench make-data --dataset-json {params.dataset} --seed {params.seed} "
        "--length {wildcards.length} --model {input.model} {params.extrapolate} --out {output} > {log} 2>&1"
