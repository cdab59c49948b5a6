"""Method entries: a registered type, fields of the right type, the method's own checks."""

from __future__ import annotations

import math
import re

from ..job import INT_MAX
from .base import warn

# fields a method type accepts (inherited) but ignores; a method class may declare `ignored_fields`
# itself (methods/head_aware.py's Uniform should: until then it is listed here)
IGNORED_FIELDS = {"uniform": ("share_retrieval", "share_induction", "share_local")}

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


def check_method(type_name: str, params: dict, name: str | None = None, budget: int | None = None):
    """Build a method from its config entry and check its parameters (at `budget`, None: without a
    budget): the type is registered, every key is a field, every value has the field's type, and the
    method's own validate(budget) passes. Returns the method; ValueError naming the variant, key and
    allowed values. An eval job builds and validates its method here, once."""
    import dataclasses
    import typing

    from ..methods import REGISTRY, method_from_config

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
        pol.validate(budget)
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


def check_geometry(pol, geom: dict | None) -> None:
    """Quantized storage groups a value row's head_dim channels in groups of min(group_size, head_dim):
    a group size below head_dim must divide it."""
    if not geom or not geom.get("head_dim"):
        return
    g, d = getattr(pol, "group_size", None), geom["head_dim"]
    if getattr(pol, "storage", "dense") != "dense" and isinstance(g, int) and 0 < g < d and d % g:
        raise ValueError(f"group_size must divide the model's head_dim ({d}) or be at least it, got {g}")
