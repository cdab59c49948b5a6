# Input helpers and the job table. The config is validated (JSON schema + method fields) before
# any job is planned; output paths are a pure function of the config.
import json
import shlex
import sys

from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from kvbench.config import (
    config_hash,
    job_config,
    job_table,
    validate_config,
)  # noqa: E402
from kvbench.figspec import FIGURE_TASKS  # noqa: E402
from kvbench.methods import REGISTRY  # noqa: E402

# Snakemake's YAML loading keeps the last of two equal keys silently: re-read the files strictly first
from kvbench.config import load_yaml  # noqa: E402

for _configfile in workflow.configfiles:
    load_yaml(str(_configfile))

# ours first: names that are path components (no `..`), strict numbers, errors naming the key
validate_config(config)
validate(config, "../schemas/config.schema.yaml")

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
# only the figures this config has data for (a figure of nothing would be an empty picture)
FIGURES = [
    f
    for f, tasks in FIGURE_TASKS.items()
    if any(j.task in tasks for j in JOBS)
    or (f == "heads" and PROFILED_MODELS)
    or (f == "training" and TRAINED_MODELS)
]


wildcard_constraints:
    length=r"\d+",
    budget=r"full|\d+",
    model=r"[A-Za-z0-9_][A-Za-z0-9_.-]*",
    dataset=r"[A-Za-z0-9_][A-Za-z0-9_.-]*",
    method=r"[A-Za-z0-9_][A-Za-z0-9_.-]*",
    name="|".join(FIGURE_TASKS),


def raw_path(j):
    return f"results/raw/{j.path}"


def method_type(wc):
    return config["methods"][wc.method]["type"]


def method_params(wc):
    m = config["methods"][wc.method]
    return shlex.quote(json.dumps({k: v for k, v in m.items() if k != "type"}))


def task_params(wc):
    return shlex.quote(json.dumps(config.get("tasks", {}).get(wc.task, {})))


def eval_inputs(wc):
    ins = {
        "model": f"resources/models/{wc.model}",
        "data": f"resources/data/{wc.model}/{wc.dataset}/L{wc.length}.jsonl",
    }
    if REGISTRY[method_type(wc)].needs_profile:
        ins["profile"] = f"results/heads/{wc.model}.parquet"
    return ins


def job_hash(wc):
    return config_hash(job_config(config, wc.model, wc.task, wc.dataset, wc.method))


def figure_inputs(wc):
    return [raw_path(j) for j in JOBS if j.task in FIGURE_TASKS[wc.name]]


def extrapolate_flag(wc):
    return "--extrapolate" if config["models"][wc.model].get("extrapolate") else ""


def gpu(wc):
    return 1 if USE_GPU else 0


AGGREGATE_OUTPUTS = [
    "results/all.parquet",
    "results/tables/cells.csv",
    *[f"results/tables/{s}.csv" for s in config["studies"]],
    *[f"results/tables/{s}.tex" for s in config["studies"]],
    *[f"results/figures/{f}.pdf" for f in FIGURES],
    *[f"results/figures/{f}.png" for f in FIGURES],
]
