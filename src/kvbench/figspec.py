"""Which raw results each figure reads. Kept free of heavy imports: the Snakefile reads it to plan
one figure's jobs, and a no-op `snakemake -n` should not pay for pandas or matplotlib."""

FIGURE_TASKS = {
    "bleu": ("translate_stream", "translate_batch"),
    "ppl": ("ppl",),
    "latency": ("latency",),
    "pareto": ("translate_stream",),
    "lagging": ("translate_stream",),
    "memory": ("translate_stream", "translate_batch", "ppl", "latency"),
    "heads": (),  # reads the head profiles
    "training": (),  # reads the builtin models' training logs
}
