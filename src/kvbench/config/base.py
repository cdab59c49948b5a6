"""Primitives every config check shares: the error type, one-line warnings, names and integers."""

from __future__ import annotations

import math
import re
import sys

from ..job import INT_MAX, Budget


class ConfigError(ValueError):
    pass


MAX_SAMPLES = 1_000_000  # documents per dataset cell: more is a typo, and building them would not end
MAX_PROMPTS = 100_000  # profiling probe prompts (kvbench profile --n-prompts has the same bound)
NAME_MAX = 64
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
SECTIONS = ("models", "datasets", "methods", "studies")  # their names are path components

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


def parse_budget(budget) -> int | None:
    """'full' (or None) -> None; a positive integer (or its exact text) -> int (job.Budget.parse)."""
    return Budget.parse(budget).tokens


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
