"""The config schema's generated block equals what the method and task dataclasses give, and config
defaults (hence job hashes) come only from where they always came.

    PYTHONPATH=src python -m pytest -q tests/test_schemagen.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest

from kvbench import schemagen
from kvbench.config import SCHEMA, job_table, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _text() -> str:
    with open(SCHEMA, encoding="utf-8") as f:
        return f.read()


def test_checked_in_schema_is_generated():
    assert schemagen.render(_text()) == _text(), "run: python -m kvbench.schemagen"
    assert schemagen.main(["--check"]) == 0


@pytest.fixture
def swapped(monkeypatch):
    """Replace a registered class by a subclass with one default changed, for the duration of a test."""
    def swap(registry, name, field, value):
        cls = registry[name]
        new = dataclasses.make_dataclass(cls.__name__, [(field, type(value), dataclasses.field(
            default=value, metadata=next(f for f in dataclasses.fields(cls) if f.name == field).metadata))],
            bases=(cls,), frozen=cls.__dataclass_params__.frozen)
        monkeypatch.setitem(registry, name, new)
    return swap


def test_a_changed_method_default_is_caught(swapped):
    from kvbench.methods import REGISTRY

    swapped(REGISTRY, "h2o", "recent_ratio", 0.25)
    assert schemagen.render(_text()) != _text()


def test_a_changed_task_default_is_caught(swapped):
    from kvbench.tasks import REGISTRY

    swapped(REGISTRY, "latency", "n_decode", 33)
    assert schemagen.render(_text()) != _text()


def test_method_defaults_are_never_filled_task_defaults_as_before():
    cfg = load_config(os.path.join(REPO, "tests", "data", "tiny.yaml"))
    assert cfg["methods"]["h2o"] == {"type": "h2o", "recent_ratio": 0.5}
    assert cfg["methods"]["head_aware"] == {"type": "head_aware"}
    # the one task section tiny.yaml writes gets every filled parameter; the others stay absent
    assert cfg["tasks"] == {"latency": {"n_decode": 4, "warmup": 1, "wait_k": 5, "target_offset": 0}}


def test_tiny_job_hashes_are_pinned():
    """Paths and hashes of the tiny config's jobs, as at 82622a7 (before the registries). If a change
    is meant to re-run every job, update the digest and say so in the commit."""
    jobs = job_table(load_config(os.path.join(REPO, "tests", "data", "tiny.yaml")))
    digest = hashlib.sha256(json.dumps([(j.path, j.hash) for j in jobs]).encode()).hexdigest()[:16]
    assert len(jobs) == 21 and digest == PINNED_TINY


PINNED_TINY = "9ab2044d38a223b9"  # computed on 82622a7


def test_json_types():
    assert schemagen.json_type(int) == {"type": "integer"}
    assert schemagen.json_type("int | None") == {"type": ["integer", "null"]}
    assert schemagen.json_type(int | None) == {"type": ["integer", "null"]}
    assert schemagen.json_type("float") == {"type": "number"}
    assert schemagen.json_type("list[int]") == {}
