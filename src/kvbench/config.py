"""Config loading, validation and the job table.

`load_config(path)` parses YAML (duplicate keys, and keys YAML reads as numbers or booleans, are
errors: `load_yaml`), checks every name that becomes a path component (`check_name`: no `.`, `..`,
`/`, at most 64 characters) and every number (integers are integers, below 2^31; no NaN or
infinity), validates it against workflow/schemas/config.schema.yaml (errors name the key), fills
defaults, then checks what a schema cannot, all without building or loading anything: every model
source parses (scheme, pinned hub revision, local folder outside the workflow's outputs, builtin
recipe, random architecture); every name a study uses exists; method parameters match the method
dataclass fields in name and type and pass the method's own checks (every defined method, used or
not); budgets fit the methods; lengths fit the models' maximum positions and hold at least one
synthetic sentence pair; quantization group sizes divide the models' head_dim; hf translation
datasets name known languages; target offsets and latency decode steps stay within the models'
positions. Soft problems are one-line warnings on stderr (`warn`): a budget at or above a
length, a study that plans no job, names that differ only by case, parameters a method or task
ignores. `job_table(cfg)` is the union of all studies' grids, deduplicated: one entry per eval
output path.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import sys

import yaml

from .job import INT_MAX, Budget, Job, config_hash, job_config  # noqa: F401 - re-exported (workflow, tests)

SCHEMA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "workflow", "schemas", "config.schema.yaml")


class ConfigError(ValueError):
    pass


MAX_SAMPLES = 1_000_000  # documents per dataset cell: more is a typo, and building them would not end
MAX_PROMPTS = 100_000  # profiling probe prompts (kvbench profile --n-prompts has the same bound)
NAME_MAX = 64
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
SECTIONS = ("models", "datasets", "methods", "studies")  # their names are path components

# fields a method type accepts (inherited) but ignores; a method class may declare `ignored_fields`
# itself (methods/head_aware.py's Uniform should: until then it is listed here)
IGNORED_FIELDS = {"uniform": ("share_retrieval", "share_induction", "share_local")}

_warned: set = set()


def warn(msg: str) -> None:
    """A one-line warning on stderr, once per message per command (reset_warnings starts a command)."""
    if msg not in _warned:
        _warned.add(msg)
        print(f"warning: {msg}", file=sys.stderr)


def reset_warnings() -> None:
    _warned.clear()


def check_name(name, what: str = "name") -> str:
    """A name used as a path component (model, dataset, method, study): letters, digits, '_', '.',
    '-', not starting with '.' or '-', at most NAME_MAX characters. ValueError naming it otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"{what} {name!r} must be text, not {type(name).__name__}")
    if len(name) > NAME_MAX:
        raise ValueError(f"{what} {name[:20]!r}... is {len(name)} characters long; at most {NAME_MAX}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} cannot be a folder name: use letters, digits, '_', '.' and '-', "
                         f"starting with a letter, digit or '_' (no '.', '..', '/' or spaces)")
    return name


def check_int(value, what: str, minimum: int | None = None, maximum: int = INT_MAX) -> int:
    """An integer (not a bool, not 2.0) within [minimum, maximum]; ValueError naming `what`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{what} must be at most {maximum}, got {value}")
    return value


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                text = getattr(key_node, "value", key)
                raise ConfigError(f"key {text!r} (line {key_node.start_mark.line + 1}) is read by YAML as "
                                  f"{type(key).__name__} {key!r}, not as text; quote it: '{text}'")
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


def parse_budget(budget) -> int | None:
    """'full' (or None) -> None; a positive integer (or its exact text) -> int (job.Budget.parse)."""
    return Budget.parse(budget).tokens


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
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= INT_MAX
    if annotation is float:  # an integer is a fine float (recent_ratio: 1); NaN and infinity are not
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= INT_MAX \
            and math.isfinite(value)
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
            kind = _type_name(fields[key])
            kind += " (finite, |x| <= 2^31-1)" if kind in ("int", "float") else ""
            raise ValueError(f"{label}: parameter {key} must be {kind}, got {value!r} ({type(value).__name__})")
    try:
        pol = method_from_config(type_name, params)
        pol.validate(None)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{label}: {e}") from None
    ignored = [k for k in params if k in (*getattr(cls, "ignored_fields", ()), *IGNORED_FIELDS.get(type_name, ()))]
    if ignored:
        warn(f"{label}: {type_name} ignores {', '.join(ignored)} (accepted only because it shares fields with "
             f"another method)")
    return pol


def string_choices(cls, field) -> tuple[str, ...] | None:
    """Allowed values of a method's str field: the field's metadata `choices`, else what the method's
    own validate() names when given a value it cannot accept."""
    if field.metadata.get("choices"):
        return tuple(field.metadata["choices"])
    probe = "\x00?"
    try:
        cls(**{field.name: probe}).validate(None)
    except (TypeError, ValueError) as e:
        msg = str(e)
        if field.name in msg:
            found = [c for c in re.findall(r"'([^']*)'", msg.split("got")[0]) if c != probe]
            return tuple(dict.fromkeys(found)) or None
    except Exception:  # noqa: BLE001 - a method that cannot be probed just lists no choices
        return None
    return None


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


def _validator(schema):
    """Draft 2020-12 with strict numbers: `integer` is an int (not 2.0, not a bool), `number` finite."""
    from jsonschema import Draft202012Validator, validators

    checker = Draft202012Validator.TYPE_CHECKER.redefine_many({
        "integer": lambda _, x: isinstance(x, int) and not isinstance(x, bool),
        "number": lambda _, x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x),
    })
    return validators.extend(Draft202012Validator, type_checker=checker)(schema)


def _check_values(node, where: str = "") -> None:
    """Every mapping key is text; every integer fits in 31 bits; every float is finite."""
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{where}/{k}" if where else str(k)
            if not isinstance(k, str):
                raise ConfigError(f"config key {here!r}: {k!r} is a {type(k).__name__}, not text (YAML reads "
                                  f"123, 1.5, yes/no, on/off, true/false and null as values): quote it")
            _check_values(v, here)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_values(v, f"{where}/{i}")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"config key {where!r}: {node!r} is not a finite number")
    elif isinstance(node, (int, float)) and not isinstance(node, bool) and abs(node) > INT_MAX:
        raise ConfigError(f"config key {where!r}: {node!r} is too large (at most {INT_MAX})")


def _check_names(cfg: dict) -> None:
    for section in SECTIONS:
        names = cfg.get(section)
        if not isinstance(names, dict):
            continue
        for name in names:
            try:
                check_name(name, section[:-1] if section != "studies" else "study")
            except ValueError as e:
                raise ConfigError(f"config key '{section}/{str(name)[:40]}': {e}") from None
        folded: dict = {}
        for name in names:
            folded.setdefault(name.lower(), []).append(name)
        for same in folded.values():
            if len(same) > 1:
                warn(f"config key '{section}': names {same} differ only by case: their result folders collide "
                     f"on case-insensitive file systems (macOS, Windows)")


def validate_config(cfg) -> dict:
    with open(SCHEMA) as f:
        schema = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ConfigError(f"config must be a mapping, got {type(cfg).__name__}")
    _check_values(cfg)
    _check_names(cfg)
    errors = sorted(_validator(schema).iter_errors(cfg), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"config key {where!r}: {e.message}")
    _warn_task_params(cfg)  # on the keys the user wrote, before defaults fill every task's section
    _fill_defaults(cfg, schema, schema)
    _apply_scale(cfg)
    _check_semantics(cfg)
    return cfg


def _apply_scale(cfg: dict) -> None:
    """`scale: s` multiplies every study's lengths and integer budgets by s (rounded; the smoke run of a
    paper grid), then becomes 1, so validating the same dict twice scales it once."""
    s = cfg.get("scale", 1)
    if s == 1:
        return
    for st in cfg["studies"].values():
        st["lengths"] = sorted({max(1, round(L * s)) for L in st["lengths"]})
        if "budgets" in st:
            st["budgets"] = [b if str(b) == "full" else max(1, round(int(b) * s)) for b in st["budgets"]]
    cfg["scale"] = 1


def merge_configs(base: dict, overlay: dict) -> dict:
    """Snakemake's rule for several --configfile: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in overlay.items():
        out[k] = merge_configs(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _warn_task_params(cfg: dict) -> None:
    from . import tasks

    for task, params in (cfg.get("tasks") or {}).items():
        reads = tasks.base.fields(task)
        unused = [k for k in params or {} if k not in reads]
        if unused:
            warn(f"config key 'tasks/{task}': {task} does not use {', '.join(unused)} (it reads "
                 f"{', '.join(reads)})")


def _check_semantics(cfg: dict) -> None:
    pols = {}
    for name, m in cfg["methods"].items():  # every defined method, used by a study or not
        try:
            pols[name] = check_method(m["type"], {k: v for k, v in m.items() if k != "type"}, name)
        except ValueError as e:
            raise ConfigError(f"config key 'methods/{name}': {e}") from None
    geoms = _check_models(cfg)
    _check_datasets(cfg)
    hf_only = ("path", "name", "split", "data_files", "src_lang", "tgt_lang", "text_field")
    for name, ds in cfg["datasets"].items():
        unused = [k for k in hf_only if k in ds] if ds.get("source", "synthetic") == "synthetic" else []
        if unused:
            warn(f"config key 'datasets/{name}': a synthetic dataset ignores {', '.join(unused)} (they are for "
                 f"source: hf)")
        if ds.get("n_samples", 4) > MAX_SAMPLES:
            raise ConfigError(f"config key 'datasets/{name}/n_samples': {ds['n_samples']} documents per cell is "
                              f"more than {MAX_SAMPLES}")
    if cfg.get("device") == "cuda":
        import torch

        if not torch.cuda.is_available():
            warn("config key 'device': cuda, but this machine has no CUDA device: jobs run here will fail "
                 "(fine if they run on GPU nodes; `device: auto` uses CUDA where there is one)")
    n_prompts = (cfg.get("profiling") or {}).get("n_prompts", 8)
    if n_prompts > MAX_PROMPTS:
        raise ConfigError(f"config key 'profiling/n_prompts': {n_prompts} probe prompts is more than {MAX_PROMPTS}")
    from . import tasks

    for task, params in (cfg.get("tasks") or {}).items():
        t = tasks.from_params(task, params)
        steps = t.extra_positions()
        for model, g in geoms.items():
            mp = (g or {}).get("max_positions")
            if mp and steps >= mp:
                raise ConfigError(f"config key 'tasks/{task}': {' + '.join(t.extra_positions_from)} ({steps}) decode "
                                  f"steps run past the maximum positions of model {model!r} ({mp})")
    for sname, st in cfg["studies"].items():
        for key in ("tasks", "models", "datasets", "methods", "lengths", "budgets"):
            twice = sorted({str(x) for x in st.get(key) or [] if (st.get(key) or []).count(x) > 1})
            if twice:
                warn(f"config key 'studies/{sname}/{key}': {', '.join(twice)} listed more than once")
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
            if too_long and not cfg["models"][model].get("extrapolate"):
                raise ConfigError(f"config key 'studies/{sname}/lengths': length {too_long[0]} is beyond the maximum "
                                  f"positions of model {model!r} ({g['max_positions']}); to run past them on "
                                  f"purpose, set models/{model}/extrapolate: true")
        for ds in st["datasets"]:
            _check_synthetic_lengths(cfg, sname, ds, st["lengths"])
        _check_target_offsets(cfg, sname, st, geoms)
        evicting = [m for m in st["methods"] if pols[m].evicts]
        for b in st["budgets"]:
            low = [L for L in st["lengths"] if parse_budget(b) is not None and parse_budget(b) >= L]
            if evicting and low:
                warn(f"config key 'studies/{sname}/budgets': budget {b} >= length {min(low)}: "
                     f"{', '.join(evicting)} keep every token there (those cells equal the full cache)")
        if not study_jobs(cfg, st):
            warn(f"config key 'studies/{sname}': it plans no job (no dataset of "
                 f"{st['datasets']} offers tasks {st['tasks']}, or an empty list)")


def _check_target_offsets(cfg: dict, sname: str, st: dict, geoms: dict) -> None:
    """Target tokens take positions target_offset, target_offset + 1, ...: a document of L tokens needs
    target_offset + L <= the model's maximum positions (translation documents: every task reads them)."""
    for task in st["tasks"]:
        off = (cfg.get("tasks") or {}).get(task, {}).get("target_offset", 0)
        if not off:
            continue
        for model in st["models"]:
            mp = (geoms.get(model) or {}).get("max_positions")
            if mp and off + max(st["lengths"]) > mp and not cfg["models"][model].get("extrapolate"):
                raise ConfigError(f"config key 'tasks/{task}/target_offset': {off} + length {max(st['lengths'])} "
                                  f"(study {sname!r}) is past the maximum positions of model {model!r} ({mp})")


def _check_models(cfg: dict) -> dict:
    """Parse every model source (no download, no build) -> {model: geometry or None}."""
    from .models import SourceError, is_commit, parse_source, source_geometry

    geoms = {}
    # where the workflow writes outputs (Snakemake deletes an output before it re-runs its job)
    outputs = [os.path.realpath(p) for p in ("resources/models", "resources/data", "results")]
    unpinned = []
    for name, m in cfg["models"].items():
        try:
            scheme, where, rev = parse_source(m["source"])
            geoms[name] = source_geometry(m["source"])
        except (SourceError, OSError, ValueError) as e:
            raise ConfigError(f"config key 'models/{name}/source': {e}") from None
        if scheme == "hub" and not is_commit(rev):
            unpinned.append(f"{name} (@{rev})")
        if scheme == "path":
            real = os.path.realpath(where)
            inside = [o for o in outputs if real == o or real.startswith(o + os.sep)]
            if inside:
                raise ConfigError(f"config key 'models/{name}/source': {where!r} is inside {inside[0]!r}, where the "
                                  f"workflow writes (and re-runs delete) outputs; keep source models elsewhere")
        ignored = [k for k in ("steps", "train") if m.get(k) not in (None, False)] if scheme != "builtin" else []
        if ignored:
            warn(f"config key 'models/{name}': {', '.join(ignored)} only apply to builtin: models, not {scheme}:")
    if unpinned:
        warn(f"config key 'models': {', '.join(unpinned)}: a branch or tag name, not a commit hash; it can move "
             f"between runs and jobs. Pin each to the 40-hex commit you evaluate (rows record the commit loaded)")
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
        key = (L, min(ds.get("n_samples", 4), 16), cfg.get("seed", 0))  # a few documents tell
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


def load_config(path: str, *overlays: str) -> dict:
    """Load, merge overlays in order (as `snakemake --configfile path overlay...`), validate."""
    cfg = load_yaml(path)
    for o in overlays:
        cfg = merge_configs(cfg, load_yaml(o))
    return validate_config(cfg)


def dataset_kind(ds: dict) -> str:
    """`parallel` (translation pairs: synthetic, or hf with a target language) or `text`."""
    return "parallel" if ds.get("tgt_lang") or ds.get("source", "synthetic") == "synthetic" else "text"


def dataset_tasks(cfg: dict, name: str) -> list[str]:
    """The dataset's `tasks`, else every registered task that runs on its kind (table order)."""
    from .tasks.base import defaults_for_kind

    ds = cfg["datasets"][name]
    if "tasks" in ds:
        return ds["tasks"]
    return defaults_for_kind(dataset_kind(ds))


def study_jobs(cfg: dict, st: dict) -> list[Job]:
    """The jobs of one (validated) study."""
    from .methods import REGISTRY

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
