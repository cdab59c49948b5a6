"""The task registry: what each task declares, and that a task added as one registered class is picked
up by config validation, the job table, the schema and `run_task` with no other edit.

    PYTHONPATH=src python -m pytest -q tests/test_task_registry.py
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from kvbench import schema, schemagen, tasks
from kvbench.config import ConfigError, dataset_tasks, job_table, load_yaml, validate_config
from kvbench.tasks.base import param, parameters, register

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registered_in_table_order_without_torch():
    assert tasks.TASKS == ("translate_stream", "translate_batch", "ppl", "latency", "niah", "ruler_niah_multikey",
                           "ruler_niah_multivalue", "ruler_vt", "ruler_cwe", "longbench", "infinitebench", "loogle")
    # config validation, aggregation and figure planning read the registry: it must stay light
    code = "import sys, kvbench.tasks; print(sorted({'torch', 'pandas', 'matplotlib'} & set(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_parameters_defaults_and_readers():
    p = parameters()
    assert {k: (f.default, f.metadata["minimum"]) for k, f in p.items()} == {
        "wait_k": (5, 1), "target_offset": (0, 0), "n_decode": (32, 1), "warmup": (4, 0), "n_depths": (5, 2),
        "query_first": (False, None), "max_new_tokens": (0, 0)}
    assert tasks.base.fields("translate_batch") == ("target_offset",)
    assert tasks.base.fields("latency") == ("wait_k", "target_offset", "n_decode", "warmup")


def test_declared_columns_are_row_columns():
    for cls in tasks.ordered():
        assert cls.columns and set(cls.columns) <= set(schema.COLUMNS), cls.name
        assert set(cls.kinds) <= set(tasks.base.KINDS) and cls.summary


def test_dataset_default_tasks_by_kind():
    cfg = {"datasets": {"s": {"source": "synthetic"}, "wt": {"source": "hf", "path": "x"},
                        "de": {"source": "hf", "path": "x", "src_lang": "en", "tgt_lang": "de"}}}
    cfg["datasets"]["hay"] = {"source": "haystack"}
    assert dataset_tasks(cfg, "s") == dataset_tasks(cfg, "de") == ["translate_stream", "translate_batch", "ppl",
                                                                   "latency"]
    assert dataset_tasks(cfg, "wt") == ["ppl", "latency"]
    assert dataset_tasks(cfg, "hay") == [t for t in tasks.TASKS if t == "niah" or t.startswith("ruler_")]


def test_a_parameter_must_mean_the_same_in_every_task():
    with pytest.raises(TypeError, match="wait_k"):
        @register
        @dataclass(frozen=True)
        class Clash(tasks.Task):
            name = "clash"
            wait_k: int = param(3, minimum=1)
    assert "clash" not in tasks.REGISTRY


@pytest.fixture
def toy(monkeypatch):
    """A task registered for one test: counts the document's words."""
    @dataclass(frozen=True)
    class Toy(tasks.Task):
        name = "toy_count"
        order = 50
        summary = "counts words"
        columns = ("src_words",)
        scale: int = param(1, minimum=1, help="multiplier")

        def run(self, session, prompter, doc):
            return {"src_words": self.scale * len(doc["source"].split())}

    monkeypatch.setitem(tasks.REGISTRY, Toy.name, Toy)
    return Toy


def test_a_new_task_is_picked_up_everywhere(toy):
    base = load_yaml(os.path.join(REPO, "tests", "data", "tiny.yaml"))
    before = {j.path: j.hash for j in job_table(validate_config(copy.deepcopy(base)))}
    cfg = copy.deepcopy(base)
    cfg["tasks"]["toy_count"] = {"scale": 2}
    cfg["studies"]["toy"] = {"tasks": ["toy_count"], "methods": ["full"], "lengths": [128]}
    jobs = {j.path: j.hash for j in job_table(validate_config(cfg))}
    assert "micro/toy_count/synth/full/L128_Bfull.parquet" in jobs
    # a new parameter is not filled into other sections: existing jobs keep their hashes
    assert cfg["tasks"]["latency"] == {"n_decode": 4, "warmup": 1, "wait_k": 5, "target_offset": 0}
    # its own section: its parameter, and the filled ones every section gets (one namespace)
    assert cfg["tasks"]["toy_count"] == {"scale": 2, "wait_k": 5, "target_offset": 0, "n_decode": 32, "warmup": 4}
    assert all(jobs[p] == h for p, h in before.items())
    assert "toy_count" in schemagen.defs()["task_name"]["enum"]
    assert tasks.run_task("toy_count", None, None, {"id": 0, "source": "a b c"}, cfg["tasks"]["toy_count"]) == \
        {"src_words": 6}
    bad = copy.deepcopy(cfg)
    bad["tasks"]["toy_count"] = {"scale": 0}
    with pytest.raises(ConfigError, match="tasks/toy_count/scale"):
        validate_config(bad)


def test_a_task_returning_an_undeclared_column_is_refused(toy, monkeypatch):
    monkeypatch.setattr(toy, "run", lambda self, *a: {"src_words": 1, "surprise": 2})
    with pytest.raises(RuntimeError, match="surprise"):
        tasks.run_task("toy_count", None, None, {"id": 0, "source": "a"}, {})


def test_task_instances_take_only_their_fields():
    t = tasks.from_params("translate_batch", {"wait_k": 9, "target_offset": 3, "n_decode": 1})
    assert dataclasses.asdict(t) == {"target_offset": 3}
