"""The Job spine: one value from config to row. The budget is parsed in one place; a job knows its
path, hash and JSON; `kvbench eval --job` gives the same rows as the same job field by field."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from kvbench.config import job_table, load_config, parse_budget
from kvbench.job import INT_MAX, Budget, Job, config_hash, job_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("value,tokens", [("full", None), (None, None), ("64", 64), (64, 64), (" 7", 7),
                                          (INT_MAX, INT_MAX), (Budget(3), 3)])
def test_budget_parses(value, tokens):
    assert Budget.parse(value).tokens == tokens == parse_budget(value)


@pytest.mark.parametrize("value", ["064", "1.5", 1.5, 0, -3, "0", True, "", "Full", INT_MAX + 1, [64]])
def test_budget_refuses(value):
    with pytest.raises(ValueError, match="budget must be"):
        Budget.parse(value)


def test_budget_text_is_the_path_component():
    assert str(Budget.parse("full")) == "full" and str(Budget.parse(128)) == "128"
    assert Budget.parse("full").is_full and not Budget(1).is_full


@pytest.fixture(scope="module")
def cfg():
    return load_config(os.path.join(REPO, "config.yaml"))


def test_every_job_round_trips_through_json(cfg):
    for j in job_table(cfg):
        back = Job.from_json(j.to_json())
        assert back == j and back.config == j.config and back.hash == j.hash
        assert j.hash == config_hash(job_config(cfg, j.model, j.task, j.dataset, j.method))
        assert j.path == f"{j.model}/{j.task}/{j.dataset}/{j.method}/L{j.length}_B{j.budget}.parquet"


def test_eval_settings_are_the_config_entries(cfg):
    j = next(j for j in job_table(cfg) if j.method == "sink4")
    s = j.eval_settings()
    m = cfg["methods"]["sink4"]
    assert s["method_type"] == m["type"] and s["params"] == {k: v for k, v in m.items() if k != "type"}
    assert s["task_params"] == cfg["tasks"][j.task] and s["config_hash"] == j.hash
    assert (s["seed"], s["device"], s["dtype"], s["chunk_size"]) == (cfg["seed"], cfg["device"], cfg["dtype"],
                                                                    cfg["chunk_size"])
    assert s["budget"] == j.budget and s["length"] == j.length and s["extrapolate"] is False


@pytest.mark.parametrize("text,msg", [("{", "not a job's JSON"), ('{"model": "m"}', "missing task"),
                                      ('[1]', "missing model"), ("no/such/file.json", "not a job's JSON")])
def test_bad_job_json(text, msg):
    with pytest.raises(ValueError, match=msg):
        Job.from_json(text)


def test_job_json_checks_its_values(cfg):
    d = json.loads(job_table(cfg)[0].to_json())
    with pytest.raises(ValueError, match="unknown keys"):
        Job.from_json(json.dumps(dict(d, extra=1)))
    with pytest.raises(ValueError, match="budget must be"):
        Job.from_json(json.dumps(dict(d, budget="-1")))
    with pytest.raises(ValueError, match="length must be an integer"):
        Job.from_json(json.dumps(dict(d, length="512")))


def _eval(args, **kw):
    return subprocess.run([sys.executable, "-m", "kvbench", "eval", *args], capture_output=True, text=True, **kw)


METRICS = ("nll_sum", "n_scored_tokens", "retained_tokens_peak", "retained_tokens_mean", "cache_bytes_peak",
           "cache_bytes_mean", "budget_bytes", "max_position", "budget", "method_params", "config_hash")


def test_job_and_fields_give_the_same_rows(tiny_model_dir, tmp_path, cfg):
    from kvbench.data import make_data

    data = str(tmp_path / "L256.jsonl")
    make_data({"source": "synthetic"}, 256, 1, 0, data)
    job = Job.from_config(cfg, "tiny", "ppl", "synth", "sink4", 256, 32)
    (tmp_path / "job.json").write_text(job.to_json())
    common = ["--model", tiny_model_dir, "--data", data]
    r = _eval([*common, "--job", str(tmp_path / "job.json"), "--out", str(tmp_path / "a.parquet")])
    assert r.returncode == 0, r.stderr
    s = job.eval_settings()
    r = _eval([*common, "--model-name", "tiny", "--task", "ppl", "--dataset", "synth", "--method", "sink4",
               "--type", s["method_type"], "--params-json", json.dumps(s["params"]), "--task-params-json",
               json.dumps(s["task_params"]), "--budget", "32", "--length", "256", "--seed", str(s["seed"]),
               "--device", s["device"], "--dtype", s["dtype"], "--chunk-size", str(s["chunk_size"]),
               "--config-hash", job.hash, "--out", str(tmp_path / "b.parquet")])
    assert r.returncode == 0, r.stderr
    a, b = (pq.read_table(str(tmp_path / f"{x}.parquet")).to_pylist()[0] for x in "ab")
    assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}
    assert a["config_hash"] == job.hash and a["budget"] == "32"


def test_job_and_field_options_do_not_mix(tiny_model_dir, tmp_path, cfg):
    job = cfg and job_table(cfg)[0]
    r = _eval(["--model", tiny_model_dir, "--data", "x.jsonl", "--out", str(tmp_path / "o.parquet"),
               "--job", job.to_json(), "--seed", "3"])
    assert r.returncode != 0 and "drop --seed" in r.stderr
    r = _eval(["--model", tiny_model_dir, "--data", "x.jsonl", "--out", str(tmp_path / "o.parquet"),
               "--task", "ppl"])
    assert r.returncode != 0 and "missing --method, --length" in r.stderr
    assert not (tmp_path / "o.parquet").exists()
