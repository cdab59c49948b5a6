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
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=120,
    params:
        source=lambda wc: config["models"][wc.model]["source"],
        steps=lambda wc: (
            f"--steps {config['models'][wc.model]['steps']}"
            if config["models"][wc.model].get("steps")
            else ""
        ),
        seed=config["seed"],
        train=lambda wc: "--train" if config["models"][wc.model].get("train") else "",
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
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=20,
    params:
        dataset=lambda wc: shlex.quote(json.dumps(config["datasets"][wc.dataset])),
        extrapolate=extrapolate_flag,
        seed=config["seed"],
    shell:
        "python -m kvbench make-data --dataset-json {params.dataset} --seed {params.seed} "
        "--length {wildcards.length} --model {input.model} {params.extrapolate} --out {output} > {log} 2>&1"
