"""The paper-shaped smoke run: config/paper.yaml through the whole DAG with config/paper_smoke.yaml
over it (tiny random twins of each architecture, local datasets in the hub layouts, lengths and
budgets x 0.1). Every study must produce its table and every planned figure its file.

    python -m pytest -q tests/test_paper_smoke.py                          (planning only: seconds)
    KVBENCH_PAPER_SMOKE=1 python -m pytest -q tests/test_paper_smoke.py    (the run: see README, Test tiers)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [os.path.join(REPO, "config", "paper.yaml"), os.path.join(REPO, "config", "paper_smoke.yaml")]
pytestmark = pytest.mark.dag


def _snakemake(workdir, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", os.path.join(REPO, "Snakefile"), "--configfile", *CONFIGS,
           "--directory", str(workdir), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def _workdir(tmp):
    """The overlay names its datasets relative to the repo: the run's folder gets the same tree."""
    shutil.copytree(os.path.join(REPO, "tests", "data", "paper"), tmp / "tests" / "data" / "paper")
    return tmp


def test_the_overlay_keeps_every_job_of_the_paper_grid():
    from kvbench.config import job_table, load_config, reset_warnings

    reset_warnings()
    paper, smoke = job_table(load_config(CONFIGS[0])), job_table(load_config(*CONFIGS))
    assert len(smoke) == len(paper)
    key = lambda j: (j.model, j.task, j.dataset, j.method)  # noqa: E731 - lengths and budgets are scaled
    assert sorted(map(key, smoke)) == sorted(map(key, paper))
    cfg = load_config(*CONFIGS)
    assert all(m["source"].startswith("random:tiny-") for m in cfg["models"].values())
    # every dataset read from files is read from the local copies in the hub layouts (haystack: generated)
    assert all(d["path"].startswith("tests/data/paper/") for d in cfg["datasets"].values() if d["source"] != "haystack")
    assert {d["source"] for d in cfg["datasets"].values()} == {"hf", "haystack", "longbench"}


def test_plans_every_study(tmp_path):
    r = _snakemake(_workdir(tmp_path), "-n")
    out = r.stdout + r.stderr
    assert "evaluate" in out and "profile_heads" in out


@pytest.mark.skipif(not os.environ.get("KVBENCH_PAPER_SMOKE"),
                    reason="the paper-shaped run takes ~45 min on 2 cores to itself: KVBENCH_PAPER_SMOKE=1")
def test_every_study_produces_its_table_and_figures(tmp_path):
    from kvbench.config import job_table, load_config

    cfg = load_config(*CONFIGS)
    wd = _workdir(tmp_path)
    _snakemake(wd, "--cores", "2", "--resources", "gpu=1")
    res = wd / "results"
    allp = pd.read_parquet(res / "all.parquet")
    assert len(allp.groupby(["model", "task", "dataset", "method", "length", "budget"])) == len(job_table(cfg))
    assert not allp["quality_meaningful"].any()  # random weights say so in every row
    for study in cfg["studies"]:
        t = pd.read_csv(res / "tables" / f"{study}.csv")
        assert len(t) > 0, study
        assert (res / "tables" / f"{study}.tex").stat().st_size > 0
    long = allp[allp["task"].str.startswith("ruler_") | (allp["task"] == "longbench")]
    assert set(long["task"]) == {"longbench", "ruler_niah_multikey", "ruler_niah_multivalue", "ruler_vt", "ruler_cwe"}
    assert long["score"].notna().all() and long["prediction"].notna().all()
    assert (allp.loc[allp["task"] == "longbench", "metric"].notna()).all()
    for fig in ("bleu", "ppl", "memory", "latency", "pareto", "lagging", "heads"):
        assert (res / "figures" / f"{fig}.pdf").stat().st_size > 5000, fig
