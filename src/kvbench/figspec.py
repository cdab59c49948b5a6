"""Which raw results each figure reads, from the figure registry (kvbench.figures). Kept free of heavy
imports: the Snakefile reads it to plan one figure's jobs, and a no-op `snakemake -n` should not pay
for pandas or matplotlib (the figure modules import them only when they draw)."""

from kvbench.figures import REGISTRY

FIGURE_TASKS = {name: f.tasks for name, f in REGISTRY.items()}  # tasks whose raw results a figure plots
FIGURE_READS = {name: f.reads for name, f in REGISTRY.items()}  # cells | rows | heads | models
