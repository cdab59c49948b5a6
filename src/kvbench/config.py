"""Config loading, validation and the job table.

`load_config(path)` parses YAML (duplicate keys are errors: `load_yaml`), validates it against
workflow/schemas/config.schema.yaml (errors name the key), fills defaults, then checks what a schema
cannot, all without building or loading anything: every model source parses (scheme, pinned hub
revision, local folder, builtin recipe, random architecture); every name a study uses exists;
method parameters match the method dataclass fields in name and type and pass the method's own
checks (every defined method, used or not); budgets fit the methods; lengths fit the models' maximum
positions and hold at least one synthetic sentence pair; quantization group sizes divide the models'
head_dim; hf translation datasets name known languages. `job_table(cfg)` is the union of all
studies' grids, deduplicated: one entry per eval output path.
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


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: let PyYAML report it
                break
            if first is not None:
                raise ConfigError(f"duplicate key {key!r} (line {first} and line {key_node.start_mark.line + 1}); "
                                  f"each key may appear once in a mapping")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str):
    """Parse a YAML (or JSON) file strictly: ConfigError naming the file for a missing file, bad UTF-8,
    malformed YAML or a duplicate key."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None


def parse_budget(budget: str | int | None) -> int | None:
    """'full' (or None) -> None; a positive integer (or its exact text) -> int; anything else: ValueError."""
    if budget in (None, "full"):
        return None
    if isinstance(budget, (bool, float)):
        raise ValueError(f"budget must be a positive integer or 'full', got {budget!r}")
    try:
        b = int(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a positive integer or 'full', got {budget!r}") from None
    if b <= 0 or str(b) != str(budget).strip():
        raise ValueError(f"budget must be a positive integer or 'full', got {budget!r}")
    return b


_SIMPLE_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _type_ok(value, annotation) -> bool:
    """Is `value` (from YAML/JSON) acceptable for a dataclass field annotated `annotation`?"""
    import types
    import typing

    if annotation is typing.Any:
        return True
    if isinstance(annotation, str):
        annotation = _SIMPLE_TYPES.get(annotation.strip(), typing.Any)
        if annotation is typing.Any:
            return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # an integer is a fine float (recent_ratio: 1)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True  # containers and other types: left to the method's own validate()


def _type_name(annotation) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def check_method(type_name: str, params: dict, name: str | None = None):
    """Build a method from its config entry and check its parameters without a budget: the type is
    registered, every key is a field, every value has the field's type, and the method's own
    validate(None) passes. Returns the method; ValueError naming the variant, key and allowed values."""
    import dataclasses
    import typing

    from .methods import REGISTRY, method_from_config

    label = f"method {name!r} ({type_name})" if name and name != type_name else f"method {type_name!r}"
    if type_name not in REGISTRY:
        raise ValueError(f"{label}: unknown method type {type_name!r}; registered: {sorted(REGISTRY)}")
    cls = REGISTRY[type_name]
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the raw strings
        hints = {}
    fields = {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}
    for key, value in params.items():
        if key in fields and not _type_ok(value, fields[key]):
            raise ValueError(f"{label}: parameter {key} must be {_type_name(fields[key])}, got {value!r} "
                             f"({type(value).__name__})")
    try:
        pol = method_from_config(type_name, params)
        pol.validate(None)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{label}: {e}") from None
    return pol


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
    pols = {}
    for name, m in cfg["methods"].items():  # every defined method, used by a study or not
        try:
            pols[name] = check_method(m["type"], {k: v for k, v in m.items() if k != "type"}, name)
        except ValueError as e:
            raise ConfigError(f"config key 'methods/{name}': {e}") from None
    geoms = _check_models(cfg)
    _check_datasets(cfg)
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
            pol = pols[mname]
            for b in st["budgets"]:
                bb = parse_budget(b)
                if pol.evicts and bb is not None:
                    try:
                        pol.validate(bb)
                    except (TypeError, ValueError) as e:
                        raise ConfigError(f"config key 'studies/{sname}': method {mname!r} at budget {b}: {e}") from None
            if pol.evicts and all(parse_budget(b) is None for b in st["budgets"]):
                raise ConfigError(f"config key 'studies/{sname}/budgets': method {mname!r} needs integer budgets")
            for model in st["models"]:
                _check_method_geometry(pol, mname, model, geoms.get(model))
        for model in st["models"]:
            g = geoms.get(model) or {}
            too_long = [L for L in st["lengths"] if g.get("max_positions") and L > g["max_positions"]]
            if too_long:
                raise ConfigError(f"config key 'studies/{sname}/lengths': length {too_long[0]} is beyond the maximum "
                                  f"positions of model {model!r} ({g['max_positions']})")
        for ds in st["datasets"]:
            _check_synthetic_lengths(cfg, sname, ds, st["lengths"])


def _check_models(cfg: dict) -> dict:
    """Parse every model source (no download, no build) -> {model: geometry or None}."""
    from .models import SourceError, parse_source, source_geometry

    geoms = {}
    for name, m in cfg["models"].items():
        try:
            parse_source(m["source"])
            geoms[name] = source_geometry(m["source"])
        except (SourceError, OSError, ValueError) as e:
            raise ConfigError(f"config key 'models/{name}/source': {e}") from None
    return geoms


def _check_datasets(cfg: dict) -> None:
    from .prompt import LANG_NAMES

    for name, ds in cfg["datasets"].items():
        if ds.get("source", "synthetic") != "hf":
            continue
        if "path" not in ds:
            raise ConfigError(f"config key 'datasets/{name}': an hf dataset needs `path` (datasets.load_dataset)")
        for key in ("src_lang", "tgt_lang"):
            if key in ds and ds[key] not in LANG_NAMES:
                raise ConfigError(f"config key 'datasets/{name}/{key}': unknown language {ds[key]!r}; known: "
                                  f"{sorted(LANG_NAMES)}")
        if ("src_lang" in ds) != ("tgt_lang" in ds):
            raise ConfigError(f"config key 'datasets/{name}': give both src_lang and tgt_lang (or neither)")


_SYNTH_CHECKED: set = set()


def _check_synthetic_lengths(cfg: dict, study: str, ds_name: str, lengths) -> None:
    """A synthetic document must hold one sentence pair: build the short ones now (milliseconds)."""
    from .data import synthetic_docs

    ds = cfg["datasets"][ds_name]
    if ds.get("source", "synthetic") != "synthetic":
        return
    for L in lengths:
        key = (L, ds.get("n_samples", 4), cfg.get("seed", 0))
        if L >= 256 or key in _SYNTH_CHECKED:  # a sentence pair is a few dozen tokens at most
            continue
        try:
            synthetic_docs(*key)
        except ValueError as e:
            raise ConfigError(f"config key 'studies/{study}/lengths': dataset {ds_name!r}: {e}") from None
        _SYNTH_CHECKED.add(key)


def _check_method_geometry(pol, mname: str, model: str, geom: dict | None) -> None:
    """Checks that need the model's shape (known without loading for builtin/random/path sources)."""
    try:
        check_geometry(pol, geom)
    except ValueError as e:
        raise ConfigError(f"config key 'methods/{mname}': method {mname!r} with model {model!r}: {e}") from None


def check_geometry(pol, geom: dict | None) -> None:
    """Quantized storage groups head_dim channels: its group size must divide head_dim."""
    if not geom or not geom.get("head_dim"):
        return
    g = getattr(pol, "group_size", None)
    if getattr(pol, "storage", "dense") != "dense" and isinstance(g, int) and g > 0 and geom["head_dim"] % g:
        raise ValueError(f"group_size must divide the model's head_dim ({geom['head_dim']}), got {g}")


def load_config(path: str) -> dict:
    return validate_config(load_yaml(path))


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
