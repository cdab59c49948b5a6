# Aggregation: all.parquet and per-study CSV/LaTeX tables from every raw result; each figure
# (PDF + PNG + its data as CSV) from only the raw results it plots, so asking for one figure runs
# only the jobs it needs.


rule aggregate:
    input:
        raw=[raw_path(j) for j in JOBS],
    output:
        all="results/all.parquet",
        cells="results/tables/cells.csv",
        tables=expand(
            "results/tables/{study}.{ext}",
            study=list(config["studies"]),
            ext=["csv", "tex"],
        ),
    log:
        "logs/aggregate.log",
    conda:
        "../../envs/kvbench.yaml"
    resources:
        mem_mb=per_attempt(4000),
        runtime=per_attempt(30),
    params:
        config=shlex.quote(json.dumps(config)),
        out=aggregate_out_dir,
    shell:
        "python -m kvbench aggregate --no-figures --config-json {params.config} --raw {input.raw} "
        "--out {params.out} > {log} 2>&1"


rule figure:
    input:
        raw=figure_inputs,
        heads=figure_heads,
        models=figure_models,
    output:
        pdf=report(
            "results/figures/{name}.pdf",
            caption="../report/figures.rst",
            category="Figures",
        ),
        png="results/figures/{name}.png",
        csv="results/figures/{name}.csv",
    log:
        "logs/figure/{name}.log",
    conda:
        "../../envs/kvbench.yaml"
    resources:
        mem_mb=per_attempt(2000),
        runtime=per_attempt(15),
    params:
        out=figure_out_dir,
        methods=" ".join(config["methods"]),
    shell:
        "python -m kvbench aggregate --figure {wildcards.name} --raw {input.raw} "
        "--heads {input.heads} --models {input.models} --methods {params.methods} "
        "--out {params.out} > {log} 2>&1"
