"""The whole DAG on the tiny config: lint, run, outputs, resume planning."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "data", "tiny.yaml")
pytestmark = pytest.mark.dag


def snakemake(workdir, *args, check=True):
    cmd = [sys.executable, "-m", "snakemake", "-s", os.path.join(REPO, "Snakefile"), "--configfile", TINY,
           "--directory", str(workdir), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def planned(workdir, *targets) -> dict[str, int]:
    """Jobs a dry run would execute, by rule (parsed from the first 'Job stats' table)."""
    r = snakemake(workdir, "-n", *targets)
    lines = (r.stdout + r.stderr).splitlines()
    counts = {}
    if "Job stats:" in lines:
        for line in lines[lines.index("Job stats:") + 3 :]:
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                break
            if parts[0] != "total":
                counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("dag")
    snakemake(wd, "--cores", "2", "--resources", "gpu=1")
    return wd


def test_lint():
    r = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--configfile", TINY], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Congratulations" in r.stdout + r.stderr, r.stdout + r.stderr


def test_snakefmt_clean():
    r = subprocess.run(["snakefmt", "--check", "Snakefile", "workflow/rules"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_outputs_exist_and_are_non_trivial(dag_run):
    res = dag_run / "results"
    allp = pd.read_parquet(res / "all.parquet")
    assert set(allp["task"]) == {"translate_stream", "translate_batch", "ppl", "latency"}
    assert set(allp["method"]) == {"full", "sink4", "h2o", "head_aware", "haq_kv", "squant"}
    assert allp["git_commit"].notna().all() and allp["config_hash"].str.len().eq(12).all()
    for study, n_rows in (("oracle", 2), ("long_sequences", 16), ("latency", 2)):
        t = pd.read_csv(res / "tables" / f"{study}.csv")
        assert len(t) == n_rows, (study, t)
        assert (res / "tables" / f"{study}.tex").read_text().count("\\midrule") >= 1
    for fig in ("bleu", "ppl", "memory", "latency", "pareto", "lagging", "training"):
        assert (res / "figures" / f"{fig}.pdf").stat().st_size > 5000
        assert (res / "figures" / f"{fig}.png").stat().st_size > 5000
    curve = pd.read_csv(res / "figures" / "training.csv")  # the micro model's loss curve
    assert set(curve["model"]) == {"micro"} and len(curve) == curve["step"].max() + 1
    bleu = pd.read_csv(res / "figures" / "bleu.csv")
    assert {"full", "sink4", "h2o"} <= set(bleu["method"]) and {128, 192} <= set(bleu["length"])
    mem = pd.read_csv(res / "tables" / "cells.csv")
    tight = mem[(mem["method"] != "full") & (mem["task"] == "ppl")]
    assert (tight["cache_bytes_peak"] < mem[(mem["method"] == "full") & (mem["task"] == "ppl")]["cache_bytes_peak"].min()).all()


def test_resume_plans_only_missing(dag_run):
    assert planned(dag_run) == {}
    victim = dag_run / "results" / "raw" / "micro" / "ppl" / "synth" / "h2o" / "L192_B32.parquet"
    victim.unlink()
    # that job, the tables, and the two figures that plot ppl results (ppl, memory)
    assert planned(dag_run) == {"evaluate": 1, "aggregate": 1, "figure": 2, "all": 1}
    snakemake(dag_run, "--cores", "2")
    assert victim.exists() and planned(dag_run) == {}


def test_report(dag_run):
    snakemake(dag_run, "--report", str(dag_run / "report.html"))
    assert (dag_run / "report.html").stat().st_size > 10000


def test_one_figure_plans_only_its_jobs(tmp_path):
    from kvbench.config import job_table, load_config

    jobs = job_table(load_config(TINY))
    want = sum(j.task in ("translate_stream", "translate_batch") for j in jobs)
    got = planned(tmp_path, "results/figures/bleu.pdf")
    assert got.get("evaluate") == want < len(jobs)
    assert "aggregate" not in got and got["figure"] == 1


def test_heads_profile_and_figure(dag_run):
    heads = pd.read_parquet(dag_run / "results" / "heads" / "micro.parquet")
    assert {"retrieval", "induction", "local", "type", "kv_type"} <= set(heads.columns)
    assert (dag_run / "results" / "figures" / "heads.png").stat().st_size > 5000
