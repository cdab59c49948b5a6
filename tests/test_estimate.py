"""The planning estimate: job counts per study and GPU hours that scale as the cost model says."""

import pytest

from kvbench import estimate
from kvbench.config import job_table, load_config


def test_paper_config_estimates_every_study():
    cfg = load_config("config/paper.yaml")
    rows = estimate.study_estimates(cfg)
    assert [r["study"] for r in rows[:-1]] == list(cfg["studies"])
    assert rows[-1]["jobs"] == len(job_table(cfg))
    assert all(r["gpu_hours"] is not None and r["gpu_hours"] > 0 for r in rows)
    # shared jobs count once in the total
    assert rows[-1]["gpu_hours"] <= sum(r["gpu_hours"] for r in rows[:-1]) + 1e-9
    assert "est. GPU h" in estimate.format_estimates(rows)


def test_model_sizes_and_scaling():
    assert estimate.model_params("hub:Qwen/Qwen2.5-7B-Instruct@abc") == pytest.approx(7e9)
    assert estimate.model_params("hub:EleutherAI/pythia-70m@abc") == pytest.approx(70e6)
    assert estimate.model_params("random:qwen2.5-0.5b") == pytest.approx(0.49e9, rel=0.05)  # the published size
    assert estimate.model_params("path:/somewhere") is None
    cfg = load_config("config/paper.yaml")
    job = next(j for j in job_table(cfg) if j.task == "translate_stream" and j.method == "full")
    t7, t70 = estimate.job_seconds(cfg, job, 7e9), estimate.job_seconds(cfg, job, 70e9)
    assert t70 > 3 * t7  # decode is bound by reading the weights (plus a fixed per-step overhead)
