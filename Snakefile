# kvbench: KV-cache compression benchmark.
#   snakemake --cores 1 --resources gpu=1            (offline default: config.yaml)
#   snakemake results/figures/bleu.pdf                (one artifact and only what it needs)
#   snakemake --workflow-profile profiles/slurm               (a Slurm cluster)

# config.yaml is the offline default; `--configfile other.yaml` replaces it (no merging of grids)
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"


# figures are seconds of work: on a cluster they run beside Snakemake instead of queueing
localrules:
    figure,


# Raw results are listed too: a deleted raw Parquet is re-run (and re-aggregated), never silently dropped.
rule all:
    input:
        AGGREGATE_OUTPUTS,
        [raw_path(j) for j in JOBS],


onsuccess:
    from kvbench.summary import main as _summary

    print("\nkvbench: done.")
    _summary(["results"])
