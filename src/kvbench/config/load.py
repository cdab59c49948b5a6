"""Loading: strict YAML, overlays merged as Snakemake merges them, JSON-schema validation (errors name
the key) with defaults filled in, then the checks a schema cannot make (kvbench.config.checks)."""

from __future__ import annotations

import json
import math
import os

import yaml

from .base import SECTIONS, ConfigError, _check_values, check_name, warn
from .checks import check_semantics, warn_task_params

SCHEMA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
                      "workflow", "schemas", "config.schema.yaml")


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


def merge_configs(base: dict, overlay: dict) -> dict:
    """Snakemake's rule for several --configfile: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in overlay.items():
        out[k] = merge_configs(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _fill_defaults(node, schema, root):
    """Schema defaults into the config, following properties, additionalProperties and $ref only: a
    method's field defaults sit under allOf/then and are never filled (its job hash holds only the
    keys the config writes), and a task parameter's only where the schema gives it a default."""
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


def load_schema() -> dict:
    """The schema file with its generated `$defs` made from the registries as they are now (a method
    or task added since the file was regenerated validates too; tests keep the file equal)."""
    from ..schemagen import defs

    with open(SCHEMA, encoding="utf-8") as f:
        schema = yaml.safe_load(f)
    schema["$defs"] = defs()
    return schema


def _message(e) -> str:
    """jsonschema's message; an unknown key also lists the keys allowed there."""
    allowed = e.schema.get("properties") if e.validator == "additionalProperties" else None
    return f"{e.message}; allowed: {', '.join(sorted(allowed))}" if isinstance(allowed, dict) else e.message


def validate_config(cfg) -> dict:
    schema = load_schema()
    if not isinstance(cfg, dict):
        raise ConfigError(f"config must be a mapping, got {type(cfg).__name__}")
    _check_values(cfg)
    _check_names(cfg)
    errors = sorted(_validator(schema).iter_errors(cfg), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"config key {where!r}: {_message(e)}")
    warn_task_params(cfg)  # on the keys the user wrote, before defaults fill every task's section
    _fill_defaults(cfg, schema, schema)
    _apply_scale(cfg)
    check_semantics(cfg)
    return cfg


def _apply_scale(cfg: dict) -> None:
    """`scale: s` multiplies every study's lengths and integer budgets by s (rounded; the smoke run of a
    paper grid); a study's own `scale` replaces it for that study (a task whose smallest sample needs more
    tokens than s leaves). Each then becomes 1, so validating the same dict twice scales it once."""
    top = cfg.get("scale", 1)
    for st in cfg["studies"].values():
        s = st.get("scale", top)
        if s != 1:
            st["lengths"] = sorted({max(1, round(L * s)) for L in st["lengths"]})
            if "budgets" in st:
                st["budgets"] = [b if str(b) == "full" else max(1, round(int(b) * s)) for b in st["budgets"]]
        if "scale" in st:
            st["scale"] = 1
    cfg["scale"] = 1


def load_config(path: str, *overlays: str) -> dict:
    """Load, merge overlays in order (as `snakemake --configfile path overlay...`), validate."""
    cfg = load_yaml(path)
    for o in overlays:
        cfg = merge_configs(cfg, load_yaml(o))
    return validate_config(cfg)
