"""Checks of the models and datasets sections, made without downloading, building or loading anything."""

from __future__ import annotations

import os

from .base import ConfigError, warn


def check_models(cfg: dict) -> dict:
    """Parse every model source (no download, no build) -> {model: geometry or None}."""
    from ..models import SourceError, is_commit, parse_source, source_geometry

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


def check_datasets(cfg: dict) -> None:
    from ..prompt import LANG_NAMES

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


def check_synthetic_lengths(cfg: dict, study: str, ds_name: str, lengths) -> None:
    """A synthetic document must hold one sentence pair: build the short ones now (milliseconds)."""
    from ..data import synthetic_docs

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
