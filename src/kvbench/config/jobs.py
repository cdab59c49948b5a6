"""The job table: every study's grid (models x tasks x datasets x methods x lengths x budgets),
deduplicated, one `kvbench.job.Job` per eval output path."""

from __future__ import annotations

import itertools

from ..job import Job


def dataset_kind(ds: dict) -> str:
    """`parallel` (translation pairs: synthetic, or hf with a target language), `haystack` (generated
    filler for the long-context tasks), a long-context benchmark (`longbench`, `infinitebench`, `loogle`:
    the kind is the source) or `text`."""
    from ..data import BENCHMARKS

    if ds.get("source") == "haystack" or ds.get("source") in BENCHMARKS:
        return ds["source"]
    return "parallel" if ds.get("tgt_lang") or ds.get("source", "synthetic") == "synthetic" else "text"


def dataset_tasks(cfg: dict, name: str) -> list[str]:
    """The dataset's `tasks`, else every registered task that runs on its kind (table order)."""
    from ..tasks.base import defaults_for_kind

    ds = cfg["datasets"][name]
    if "tasks" in ds:
        return ds["tasks"]
    return defaults_for_kind(dataset_kind(ds))


def study_jobs(cfg: dict, st: dict) -> list[Job]:
    """The jobs of one (validated) study."""
    from ..methods import REGISTRY

    jobs = []
    for model, task, ds, method, length in itertools.product(
        st["models"], st["tasks"], st["datasets"], st["methods"], st["lengths"]
    ):
        if task not in dataset_tasks(cfg, ds):
            continue
        evicts = REGISTRY[cfg["methods"][method]["type"]].evicts
        budgets = ["full"] if not evicts else [b for b in st["budgets"] if b != "full"]
        jobs += [Job.from_config(cfg, model, task, ds, method, length, b) for b in budgets]
    return jobs


def job_table(cfg: dict) -> list[Job]:
    jobs: dict[str, Job] = {}
    for st in cfg["studies"].values():
        for j in study_jobs(cfg, st):
            jobs.setdefault(j.path, j)
    return sorted(jobs.values(), key=lambda j: j.path)
