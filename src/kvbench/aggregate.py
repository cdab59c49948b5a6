"""Aggregation: raw per-sample result Parquets -> one table, per-cell scores, study tables, figures.

    python -m kvbench.aggregate --raw results/raw/**/*.parquet --heads results/heads/*.parquet \
        --config config.yaml --out results

Writes (all atomically: temp name in the same directory, then os.replace):
  {out}/all.parquet            every raw row, schema-checked (files of unknown version are refused)
  {out}/tables/cells.csv       one row per (model, task, dataset, method, length, budget) cell
  {out}/tables/{study}.csv|.tex  per study in config["studies"] (booktabs, best value in bold)
  {out}/figures/{name}.pdf|.png|.csv  see kvbench.figures

Translation quality is corpus BLEU/chrF over the stored texts (sacreBLEU, signatures kept);
each compressed translation cell is compared to the `full` cell of the same (model, task, dataset,
length) with a paired bootstrap over shared sample ids. Config keys read here: `studies` (the tables)
and `aggregate: {n_resamples: 1000, seed: 0}` (bootstrap resamples, 0: no CIs or tests; its seed).
Cells: kvbench.cells; LaTeX tables: kvbench.tables; figures: kvbench.figures.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import pandas as pd
import pyarrow.parquet as pq

from kvbench import figures
from kvbench.cells import KEYS, _cell, cell_table, read_raw, sort_cells, study_cells  # noqa: F401 - re-exported
from kvbench.io import atomic_path, atomic_write_text
from kvbench.tables import study_tex


def _write_csv(df: pd.DataFrame, path: str) -> str:
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)
    return path


def figure(name: str, raw_files: list[str], out_dir: str, heads_files: list[str] = (),
           model_dirs: list[str] = (), methods: list[str] = ()) -> list[str]:
    """One figure (PDF, PNG and its data as CSV) from the inputs it reads: the cell table of its raw
    files (or those files' rows), head profiles or model folders; `methods` (the config's, in order) fix
    each method's colour across figures."""
    from kvbench.figures._draw import set_methods

    if name not in figures.REGISTRY:
        raise ValueError(f"unknown figure {name!r}; known: {sorted(figures.REGISTRY)}")
    fig = figures.REGISTRY[name]
    set_methods(methods)
    if fig.reads == "heads":
        data = list(heads_files)
    elif fig.reads == "models":
        data = list(model_dirs)
    else:
        if not raw_files:
            raise ValueError(f"aggregate: figure {name!r} has no raw result files to plot (existing figures untouched)")
        if fig.reads == "rows":
            return fig.draw(read_raw(list(raw_files)).to_pandas(), os.path.join(out_dir, "figures"))
        data = cell_table(read_raw(list(raw_files)).to_pandas(), n_resamples=0)  # figures need no bootstrap
    return fig.draw(data, os.path.join(out_dir, "figures"))


def _options(config: dict) -> tuple[int, int]:
    """(n_resamples, seed) of the config's `aggregate` section."""
    opts = config.get("aggregate") or {}
    n_resamples = opts.get("n_resamples", 1000)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 0:
        raise ValueError(f"aggregate.n_resamples must be a whole number >= 0, got {n_resamples!r}")
    if n_resamples < 1:
        warnings.warn("aggregate.n_resamples is 0: tables get no confidence intervals and no significance tests")
    return n_resamples, int(opts.get("seed", 0))


def aggregate(raw_files: list[str], config: dict, out_dir: str, heads_files: list[str] = (),
              with_figures: bool = True) -> dict:
    """Run the whole aggregation; returns {path relative to out_dir: absolute path} of every file written."""
    from kvbench.figures._draw import set_methods

    set_methods(config.get("methods") or ())
    if not raw_files:  # an empty aggregation would replace every table with an empty one
        raise ValueError("aggregate: no raw result files given; nothing to aggregate (existing results untouched)")
    n_resamples, seed = _options(config)
    table = read_raw(list(raw_files))
    written = {}
    all_path = os.path.join(out_dir, "all.parquet")
    with atomic_path(all_path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    written["all.parquet"] = all_path

    cells = cell_table(table.to_pandas(), n_resamples, seed)
    written["tables/cells.csv"] = _write_csv(cells, os.path.join(out_dir, "tables", "cells.csv"))
    for name, spec in (config.get("studies") or {}).items():
        sc = study_cells(cells, spec or {})
        written[f"tables/{name}.csv"] = _write_csv(sc, os.path.join(out_dir, "tables", f"{name}.csv"))
        tex = os.path.join(out_dir, "tables", f"{name}.tex")
        atomic_write_text(tex, study_tex(sc, name))
        written[f"tables/{name}.tex"] = tex

    fig_dir = os.path.join(out_dir, "figures")
    rows = table.to_pandas() if with_figures else None
    for path in figures.write_all(cells, list(heads_files), fig_dir, rows=rows) if with_figures else []:
        written[os.path.relpath(path, out_dir)] = path
    return {k: os.path.abspath(v) for k, v in written.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kvbench aggregate", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", nargs="*", default=[], metavar="FILE", help="raw per-sample result Parquets")
    p.add_argument("--heads", nargs="*", default=[], metavar="FILE", help="head-profile Parquets (optional)")
    p.add_argument("--models", nargs="*", default=[], metavar="DIR",
                   help="model folders whose training_log.csv the training figure plots")
    p.add_argument("--figure", help=f"write only this figure ({', '.join(figures.REGISTRY)})")
    p.add_argument("--no-figures", action="store_true", help="tables and all.parquet only")
    p.add_argument("--methods", nargs="*", default=[], metavar="NAME",
                   help="every method of the config, in order (gives each method one colour in every figure)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="config.yaml (its `studies` select the tables)")
    g.add_argument("--config-json", help="the same config as one JSON object (what the Snakemake rule passes)")
    p.add_argument("--out", default="results", metavar="DIR", help="output directory (default: results)")
    args = p.parse_args(argv)
    if args.figure:
        paths = figure(args.figure, args.raw, args.out, args.heads, args.models, args.methods)
        print(f"aggregate: figure {args.figure} from {len(args.raw)} raw files -> {paths}")
        return 0
    if not (args.config or args.config_json):
        p.error("--config or --config-json is required (unless --figure)")
    if args.config_json:
        try:
            config = json.loads(args.config_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config-json: not valid JSON ({e})") from None
    else:  # only `studies` (and `aggregate`) are read here; the full config is validated upstream
        from kvbench.config import load_yaml

        config = load_yaml(args.config) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{args.config or '--config-json'}: the config must be a mapping")
    written = aggregate(args.raw, config, args.out, args.heads, with_figures=not args.no_figures)
    print(f"aggregate: {len(args.raw)} raw files -> {len(written)} outputs under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
