"""The long-context tasks through Snakemake: a config of haystack documents plans and runs niah (the
shipped builtin model) and a RULER task (a random-weight twin) to rows, tables and the niah figure."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDLE = os.path.join(REPO, "tests", "data", "needle.yaml")
pytestmark = pytest.mark.dag


def snakemake(workdir, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", os.path.join(REPO, "Snakefile"), "--configfile", NEEDLE,
           "--directory", str(workdir), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def test_needle_config_plans_and_runs(tmp_path):
    from kvbench.config import job_table, load_config

    jobs = job_table(load_config(NEEDLE))
    assert sorted({(j.model, j.task) for j in jobs}) == [("rnd", "ruler_niah_multikey"), ("tiny", "niah")]
    assert len(jobs) == 6
    dry = snakemake(tmp_path, "-n")
    assert "make_data" in dry.stdout + dry.stderr
    snakemake(tmp_path, "--cores", "2", "--resources", "gpu=1")
    res = tmp_path / "results"
    rows = pd.read_parquet(res / "all.parquet")
    niah = rows[rows["task"] == "niah"]
    assert len(niah) == 8 and set(niah["depth"]) == {0.0, 1.0} and niah["score"].isin([0.0, 1.0]).all()
    assert (niah["query_first"] == False).all()  # noqa: E712
    full = niah[niah["method"] == "full"]
    assert full["score"].mean() >= 0.5  # the shipped model recalls a binding from its cache
    ruler = rows[rows["task"] == "ruler_niah_multikey"]
    assert len(ruler) == 4 and ruler["subtask"].eq("niah_multikey").all() and not ruler["quality_meaningful"].any()
    cells = pd.read_csv(res / "tables" / "cells.csv")
    assert cells.loc[cells["task"] == "niah", "accuracy"].notna().all()
    fig = pd.read_csv(res / "figures" / "niah.csv")
    assert set(fig["depth"]) == {0.0, 1.0} and set(fig["length"]) == {128, 256}
    assert (res / "figures" / "niah.png").stat().st_size > 5000
