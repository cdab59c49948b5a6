"""Figures of the aggregated results: one module per figure, each registering a `Figure` (its name,
the tasks whose raw results it plots, what it reads, its plotting function); every public module of
this package is imported here (pkgutil), so adding a figure is adding its file.

Each figure writes {out_dir}/{name}.pdf, .png and .csv (the plotted series, for tests and CI),
atomically; a figure without data is still written, with a "no data" message inside, so Snakemake
outputs exist. The Snakefile reads the registry (kvbench.figspec) to plan each figure's jobs, so
this package and the figure modules import nothing heavy at the top: their plotting functions import
the drawing helpers (`_draw`: matplotlib, seaborn, pandas) when they run. Normally run through
`python -m kvbench aggregate --figure NAME ...`; `write_all` renders every figure.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

READS = ("cells", "rows", "heads", "models")


@dataclass(frozen=True)
class Figure:
    """`reads`: `cells` (the cell table of the raw results of `tasks`), `rows` (those raw results
    themselves, one row per sample: for a figure of a quantity within a cell, e.g. niah's depth),
    `heads` (the head-profile Parquets) or `models` (folders of the models trained here).
    `plot(data, out_dir)` -> paths written."""

    name: str
    tasks: tuple[str, ...]
    plot: Callable
    reads: str = "cells"

    def draw(self, data, out_dir: str) -> list[str]:
        from ._draw import theme

        with theme():  # nothing is created before the figure is saved (a bad input leaves no folder)
            return self.plot(data, out_dir)


REGISTRY: dict[str, Figure] = {}


def register(fig: Figure) -> Figure:
    if fig.reads not in READS:
        raise ValueError(f"figure {fig.name}: reads must be one of {READS}, got {fig.reads!r}")
    if fig.reads not in ("cells", "rows") and fig.tasks:
        raise ValueError(f"figure {fig.name}: only a figure of cells or rows reads raw results (tasks)")
    REGISTRY[fig.name] = fig
    return fig


for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")


def write_all(cells, heads_files: list[str], out_dir: str, model_dirs: list[str] | None = None,
              rows=None) -> list[str]:
    """Every figure of cells and heads (and of models when `model_dirs` is given, of raw rows when
    `rows` is); the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    data = {"cells": cells, "rows": rows, "heads": list(heads_files), "models": model_dirs}
    return [p for f in REGISTRY.values() if data[f.reads] is not None for p in f.draw(data[f.reads], out_dir)]
