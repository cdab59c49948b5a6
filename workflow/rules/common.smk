# Input, parameter and resource helpers, and the job table. The config is validated (JSON schema +
# method fields) before any job is planned; output paths are a pure function of the config.
import json
import os
import shlex
import sys

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from kvbench.config import job_table, validate_config  # noqa: E402
from kvbench.job import Job  # noqa: E402
from kvbench.figspec import FIGURE_READS, FIGURE_TASKS  # noqa: E402
from kvbench.methods import REGISTRY  # noqa: E402

# Snakemake's YAML loading keeps the last of two equal keys silently: re-read the files strictly first
from kvbench.config import load_yaml  # noqa: E402

for _configfile in workflow.configfiles:
    load_yaml(str(_configfile))

# Validated once per Snakemake process, here: workflow/schemas/config.schema.yaml (defaults filled
# in) plus what a schema cannot say: names that are path components (no `..`), strict numbers,
# method fields, model positions. Errors name the key.
validate_config(config)

# Local runs: each kvbench command is forked from a warm server that has imported torch and
# transformers once (kvbench/warm.py), instead of paying ~10 s of imports per job. Jobs inherit the
# variable from this process; a cluster's jobs (and the remote side of one) start their own process.
# `KVBENCH_WARM=0 snakemake ...` turns it off.
if workflow.local_exec and not workflow.remote_exec:
    os.environ.setdefault("KVBENCH_WARM", "1")

JOBS = job_table(config)
USE_GPU = config.get("device", "auto") == "cuda"
PROFILED_MODELS = sorted(
    {
        j.model
        for j in JOBS
        if REGISTRY[config["methods"][j.method]["type"]].needs_profile
    }
)
# models trained here (their loss curves make the training figure)
TRAINED_MODELS = sorted(
    {
        j.model
        for j in JOBS
        if config["models"][j.model]["source"].startswith("builtin:")
    }
)
# only the figures this config has data for (a figure of nothing would be an empty picture): raw
# results of a task it plots, head profiles or trained models, whichever it reads
FIGURE_DATA = {"heads": bool(PROFILED_MODELS), "models": bool(TRAINED_MODELS)}
FIGURES = [
    f
    for f, tasks in FIGURE_TASKS.items()
    if any(j.task in tasks for j in JOBS) or FIGURE_DATA.get(FIGURE_READS[f], False)
]


wildcard_constraints:
    length=r"\d+",
    budget=r"full|\d+",
    model=r"[A-Za-z0-9_][A-Za-z0-9_.-]*",
    dataset=r"[A-Za-z0-9_][A-Za-z0-9_.-]*",
    method=r"[A-Za-z0-9_][A-Za-z0-9_.-]*",
    name="|".join(FIGURE_TASKS),


# ---- paths and inputs


def raw_path(j):
    """Raw result Parquet of one job of the job table."""
    return f"results/raw/{j.path}"


def eval_inputs(wc):
    """Model, documents and, for a method that needs one, the head profile of an eval job."""
    ins = {
        "model": f"resources/models/{wc.model}",
        "data": f"resources/data/{wc.model}/{wc.dataset}/L{wc.length}.jsonl",
    }
    if REGISTRY[method_type(wc)].needs_profile:
        ins["profile"] = f"results/heads/{wc.model}.parquet"
    return ins


def figure_inputs(wc):
    """Raw results a figure plots: every job of the tasks it shows."""
    return [raw_path(j) for j in JOBS if j.task in FIGURE_TASKS[wc.name]]


def figure_heads(wc):
    """Head profiles of every profiled model, for a figure that reads them."""
    if FIGURE_READS[wc.name] != "heads":
        return []
    return expand("results/heads/{model}.parquet", model=PROFILED_MODELS)


def figure_models(wc):
    """Folders of the models trained here (their loss curves), for a figure that reads them."""
    if FIGURE_READS[wc.name] != "models":
        return []
    return expand("resources/models/{model}", model=TRAINED_MODELS)


# ---- params: command-line values of one job


def model_source(wc):
    """The model's source string (builtin:, hub:, path: or random:)."""
    return config["models"][wc.model]["source"]


def steps_flag(wc):
    """`--steps N` when the config sets the model's training steps, else nothing."""
    steps = config["models"][wc.model].get("steps")
    return f"--steps {steps}" if steps else ""


def train_flag(wc):
    """`--train` when the config asks to train the model here, else nothing."""
    return "--train" if config["models"][wc.model].get("train") else ""


def dataset_json(wc):
    """The dataset's config section as one shell-quoted JSON word."""
    return shlex.quote(json.dumps(config["datasets"][wc.dataset]))


def method_type(wc):
    """Registered type of the method variant (e.g. streaming_llm for sink4)."""
    return config["methods"][wc.method]["type"]


def profile_flag(wc, input):
    """`--profile FILE` when the eval job takes a head profile, else nothing."""
    return f"--profile {input.profile}" if "profile" in input.keys() else ""


def job_json(wc):
    """The eval job (kvbench.job.Job: cell, budget, its config slice) as one shell-quoted JSON word."""
    return shlex.quote(
        Job.from_config(
            config, wc.model, wc.task, wc.dataset, wc.method, int(wc.length), wc.budget
        ).to_json()
    )


def extrapolate_flag(wc):
    """`--extrapolate` when the model allows lengths past its positions, else nothing."""
    return "--extrapolate" if config["models"][wc.model].get("extrapolate") else ""


def aggregate_out_dir(wc, output):
    """Results folder that aggregation writes all.parquet and tables/ into."""
    return os.path.dirname(output.all)


def figure_out_dir(wc, output):
    """Results folder above figures/, for a figure job."""
    return os.path.dirname(os.path.dirname(output.pdf))


# ---- resources: what one job needs, declared by each rule (profiles/ only map them to an
# executor). Retries (`retries` in the profiles) ask for `attempt` times the first request,
# so a job killed for memory or time gets twice as much on attempt 2.


def per_attempt(first):
    """Resource function: `first` (MB of memory, minutes of runtime) times the attempt number."""

    def scaled(wildcards, attempt):
        return first * attempt

    return scaled


def gpu(wc):
    """GPUs a model-running job holds: 1 on CUDA (locally `--resources gpu=1` limits them), else 0."""
    return 1 if USE_GPU else 0


AGGREGATE_OUTPUTS = [
    "results/all.parquet",
    "results/tables/cells.csv",
    *[f"results/tables/{s}.csv" for s in config["studies"]],
    *[f"results/tables/{s}.tex" for s in config["studies"]],
    *[f"results/figures/{f}.pdf" for f in FIGURES],
    *[f"results/figures/{f}.png" for f in FIGURES],
]
