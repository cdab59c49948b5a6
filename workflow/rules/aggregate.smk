# Aggregation: all.parquet, per-study CSV/LaTeX tables, figures (PDF + PNG) for the report.


rule aggregate:
    input:
        raw=[raw_path(j) for j in JOBS],
        heads=expand("results/heads/{model}.parquet", model=PROFILED_MODELS),
    output:
        all="results/all.parquet",
        cells="results/tables/cells.csv",
        tables=expand(
            "results/tables/{study}.{ext}",
            study=list(config["studies"]),
            ext=["csv", "tex"],
        ),
        figures=[
            report(
                f"results/figures/{f}.pdf",
                caption="../report/figures.rst",
                category="Figures",
            )
            for f in FIGURES
        ],
        pngs=[f"results/figures/{f}.png" for f in FIGURES],
    log:
        "logs/aggregate.log",
    conda:
        "../../envs/kvbench.yaml"
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=30,
    params:
        config=shlex.quote(json.dumps(config)),
        out=lambda wc, output: os.path.dirname(output.all),
    shell:
        "python -m kvbench aggregate --config-json {params.config} --raw {input.raw} "
        "--heads {input.heads} --out {params.out} > {log} 2>&1"
