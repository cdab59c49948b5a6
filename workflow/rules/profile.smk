# Attention-head profiling: retrieval / induction / local scores and types per head.


rule profile_heads:
    input:
        model="resources/models/{model}",
    output:
        "results/heads/{model}.parquet",
    log:
        "logs/profile_heads/{model}.log",
    conda:
        "../../envs/kvbench.yaml"
    resources:
        gpu=gpu,
        mem_mb=per_attempt(16000),
        runtime=per_attempt(120),
    params:
        n_prompts=config["profiling"]["n_prompts"],
        seed=config["seed"],
    shell:
        "python -m kvbench profile --model {input.model} --out {output} --seed {params.seed} "
        "--n-prompts {params.n_prompts} > {log} 2>&1"
