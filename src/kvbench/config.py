"""Config loading, validation and the job table.

`load_config(path)` parses YAML, validates it against workflow/schemas/config.schema.yaml (errors
name the key), fills defaults, then checks what a schema cannot: every name a study uses exists,
method parameters match the method dataclass fields, budgets fit the methods. `job_table(cfg)` is
the union of all studies' grids, deduplicated: one entry per eval output path.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass

import yaml

SCHEMA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "workflow", "schemas", "config.schema.yaml")
TRANSLATION = ("translate_stream", "translate_batch")


class ConfigError(ValueError):
    pass


def _fill_defaults(node, schema, root):
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
    if not isinstance(node, dict) or schema.get("type") != "object":
        return
    for k, sub in schema.get("properties", {}).items():
        if k not in node and "default" in sub:
            node[k] = json.loads(json.dumps(sub["default"]))
        if k in node:
            _fill_defaults(node[k], sub, root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for k, v in node.items():
            if k not in schema.get("properties", {}):
                _fill_defaults(v, extra, root)


def validate_config(cfg) -> dict:
    import jsonschema

    with open(SCHEMA) as f:
        schema = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ConfigError(f"config must be a mapping, got {type(cfg).__name__}")
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(cfg), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"config key {where!r}: {e.message}")
    _fill_defaults(cfg, schema, schema)
    _check_semantics(cfg)
    return cfg


def _check_semantics(cfg: dict) -> None:
    from .evaluate import parse_budget
    from .methods import method_from_config

    for name, m in cfg["methods"].items():
        params = {k: v for k, v in m.items() if k != "type"}
        try:
            pol = method_from_config(m["type"], params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key 'methods/{name}': {e}") from None
    for sname, st in cfg["studies"].items():
        for key, pool in (("models", cfg["models"]), ("datasets", cfg["datasets"]), ("methods", cfg["methods"])):
            st.setdefault(key, sorted(pool)) if key != "methods" else None
            unknown = [x for x in st.get(key, []) if x not in pool]
            if unknown:
                raise ConfigError(f"config key 'studies/{sname}/{key}': unknown {key} {unknown}; defined: {sorted(pool)}")
        st.setdefault("budgets", ["full"])
        for b in st["budgets"]:
            parse_budget(b)
        for mname in st["methods"]:
            m = cfg["methods"][mname]
            pol = method_from_config(m["type"], {k: v for k, v in m.items() if k != "type"})
            for b in st["budgets"]:
                bb = parse_budget(b)
                if pol.evicts and bb is not None:
                    try:
                        pol.validate(bb)
                    except ValueError as e:
                        raise ConfigError(f"config key 'studies/{sname}': method {mname!r} at budget {b}: {e}") from None
            if pol.evicts and all(parse_budget(b) is None for b in st["budgets"]):
                raise ConfigError(f"config key 'studies/{sname}/budgets': method {mname!r} needs integer budgets")


def load_config(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    return validate_config(cfg)


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def job_config(cfg: dict, model: str, task: str, dataset: str, method: str) -> dict:
    """The part of the config one eval job depends on (its hash is the row's `config_hash`, so
    editing an unrelated study never re-runs a finished job)."""
    keys = ("seed", "device", "dtype", "chunk_size")
    return dict(
        {k: cfg.get(k) for k in keys}, model=cfg["models"][model], dataset=cfg["datasets"][dataset],
        method=cfg["methods"][method], task=cfg.get("tasks", {}).get(task, {}),
    )


@dataclass(frozen=True)
class Job:
    model: str
    task: str
    dataset: str
    method: str
    length: int
    budget: str  # "full" or integer text

    @property
    def path(self) -> str:
        return f"{self.model}/{self.task}/{self.dataset}/{self.method}/L{self.length}_B{self.budget}.parquet"


def dataset_tasks(cfg: dict, name: str) -> list[str]:
    ds = cfg["datasets"][name]
    if "tasks" in ds:
        return ds["tasks"]
    return ["translate_stream", "translate_batch", "ppl", "latency"] if ds.get("tgt_lang") or \
        ds.get("source", "synthetic") == "synthetic" else ["ppl", "latency"]


def job_table(cfg: dict) -> list[Job]:
    from .methods import REGISTRY

    jobs: dict[str, Job] = {}
    for st in cfg["studies"].values():
        for model, task, ds, method, length in itertools.product(
            st["models"], st["tasks"], st["datasets"], st["methods"], st["lengths"]
        ):
            if task not in dataset_tasks(cfg, ds):
                continue
            evicts = REGISTRY[cfg["methods"][method]["type"]].evicts
            budgets = ["full"] if not evicts else [str(b) for b in st["budgets"] if b != "full"]
            for b in budgets:
                j = Job(model, task, ds, method, int(length), b)
                jobs.setdefault(j.path, j)
    return sorted(jobs.values(), key=lambda j: j.path)
