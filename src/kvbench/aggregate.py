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
length) with a paired bootstrap over shared sample ids. Optional config keys:
`aggregate: {n_resamples: 1000, seed: 0}`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kvbench import figures
from kvbench.figspec import FIGURE_TASKS  # which tasks each figure reads (its rule asks for exactly those)
from kvbench.io import atomic_path, atomic_write_text
from kvbench.stats import MIN_TEST_SAMPLES
from kvbench import tasks
from kvbench.schema import ARROW_SCHEMA, COLUMNS, SchemaError, check_version, missing_ok

KEYS = ["model", "task", "dataset", "method", "length", "budget"]
QUALITY = ("bleu", "chrf", "perplexity")  # blanked in .tex when quality_meaningful is False
# (cell column, .tex header, "max"/"min" = which value is best and bold, None = never bold)
TEX_METRICS = [
    ("bleu", "BLEU", "max"), ("bleu_ci", r"95\% CI", None), ("chrf", "chrF", "max"),
    ("bleu_delta", r"$\Delta$BLEU", None), ("bleu_p_value", "$p_{bs}$", None), ("bleu_p_ar", "$p_{ar}$", None),
    ("al", "AL", "min"), ("laal", "LAAL", "min"), ("perplexity", "PPL", "min"), ("ppl_ci", r"95\% CI", None),
    ("ppl_increase_pct", r"PPL +\%", None),
    ("decode_ms_median", "ms/tok (med.)", "min"), ("decode_ms_p90", "ms/tok (p90)", "min"),
    ("speedup_vs_full", "speedup", None), ("compression_vs_full", "compr.", None),
    ("cache_bytes_peak", "cache peak", "min"),
]


# ----------------------------------------------------------------------------- reading
def read_raw(raw_files: list[str]) -> pa.Table:
    """Read and schema-check every raw Parquet; SchemaError naming the file if one is unusable."""
    tables = []
    for path in raw_files:
        try:
            t = pq.read_table(path)
        except Exception as exc:  # truncated, not Parquet, unreadable: all mean "re-run this job"
            raise SchemaError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from exc
        if "schema_version" not in t.column_names:
            check_version(None, path)
        versions = set(t.column("schema_version").to_pylist())
        if not versions:  # no rows: fall back to the file-level metadata
            meta = (t.schema.metadata or {}).get(b"kvbench_schema_version")
            versions = {int(meta) if meta else None}
        for v in sorted(versions, key=str):
            check_version(v, path)
        old = set.intersection(*(missing_ok(v) for v in versions))  # added since the file's version
        for c in sorted(old - set(t.column_names)):
            t = t.append_column(pa.field(c, COLUMNS[c]), pa.nulls(t.num_rows, COLUMNS[c]))
        missing = [c for c in COLUMNS if c not in t.column_names]
        if missing:
            raise SchemaError(f"{path}: columns missing for its schema version: {missing}")
        try:
            tables.append(t.select(list(COLUMNS)).cast(ARROW_SCHEMA))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SchemaError(f"{path}: column types differ from the schema ({exc})") from exc
    if not tables:
        return ARROW_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    _check_duplicates(table, [p for p, t in zip(raw_files, tables) for _ in range(t.num_rows)])
    return table


def _check_duplicates(table: pa.Table, origin: list[str]) -> None:
    df = table.select(KEYS + ["sample_id"]).to_pandas().assign(_file=origin)
    dup = df[df.duplicated(KEYS + ["sample_id"], keep=False)]
    if len(dup):
        raise ValueError(f"the same samples appear more than once in: {sorted(set(dup['_file']))}")


# ----------------------------------------------------------------------------- cells
def _one(s: pd.Series):
    vals = sorted({str(v) for v in s.dropna()})
    return "+".join(vals) if vals else None


def _task(name: str):
    """The registered task of a cell (its scores), or the base task (no scores) for an unknown name."""
    return tasks.REGISTRY[name]() if name in tasks.REGISTRY else tasks.Task()


def _cell(g: pd.DataFrame) -> dict:
    row: dict = {"n_samples": len(g)}
    row.update(_task(g["task"].iloc[0]).cell(g))
    bb = g["budget_bytes"].dropna()
    row.update(
        cache_bytes_peak=g["cache_bytes_peak"].mean(), cache_bytes_mean=g["cache_bytes_mean"].mean(),
        retained_tokens_mean=g["retained_tokens_mean"].mean(),
        budget_bytes=float(bb.iloc[0]) if len(bb) else np.nan, budget_tokens=g["budget_tokens"].max(),
        layout=_one(g["layout"]), compute=_one(g["compute"]), method_type=_one(g["method_type"]),
        wall_seconds=g["wall_seconds"].sum(min_count=1),
        max_position=g["max_position"].max(), model_max_positions=g["model_max_positions"].max(),
        # null means "not marked": only an explicit False makes a cell's quality meaningless
        quality_meaningful=bool((g["quality_meaningful"] != False).all()),  # noqa: E712
    )
    return row


def _derived(full: dict, row: dict) -> dict:
    """Against the full cache of the same task, dataset and length (the StreamingLLM project's derived
    metrics): decode speedup, KV compression ratio (peak bytes) and perplexity increase in percent."""
    def ratio(num, den):
        return num / den if pd.notna(num) and pd.notna(den) and den > 0 else np.nan

    out = {"speedup_vs_full": ratio(full.get("decode_ms_median"), row.get("decode_ms_median")),
           "compression_vs_full": ratio(full.get("cache_bytes_peak"), row.get("cache_bytes_peak"))}
    r = ratio(row.get("perplexity"), full.get("perplexity"))
    out["ppl_increase_pct"] = 100 * (r - 1) if pd.notna(r) else np.nan
    return out


def cell_table(df: pd.DataFrame, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (model, task, dataset, method, length, budget); see the module docstring."""
    groups = {k: g for k, g in df.groupby(KEYS, sort=True, dropna=False)}
    rows = []
    for key, g in groups.items():
        row = dict(zip(KEYS, key)) | _cell(g)
        model, task, dataset, method, length, _ = key
        full = groups.get((model, task, dataset, "full", length, "full"))
        if n_resamples > 0:
            row |= _task(task).cell_ci(g, n_resamples, seed)
        if full is not None and method != "full":
            row |= _derived(_cell(full), row)
            if n_resamples > 0:
                row |= _task(task).versus_full(g, full, n_resamples, seed)
        rows.append(row)
    cols = KEYS + ["n_samples", "bleu", "chrf", "al", "laal", "lagging_skipped", "perplexity", "decode_ms_median",
                   "decode_ms_p90", "cache_bytes_peak", "cache_bytes_mean", "retained_tokens_mean",
                   "budget_bytes", "budget_tokens", "layout", "compute", "method_type", "wall_seconds",
                   "max_position", "model_max_positions", "quality_meaningful", "bleu_ci_low", "bleu_ci_high", "chrf_ci_low", "chrf_ci_high",
                   "perplexity_ci_low", "perplexity_ci_high", "bleu_delta", "bleu_p_value", "bleu_p_ar",
                   "significance", "n_paired", "n_resamples", "speedup_vs_full", "compression_vs_full",
                   "ppl_increase_pct", "bleu_signature", "chrf_signature"]
    return sort_cells(pd.DataFrame(rows, columns=cols))


def sort_cells(cells: pd.DataFrame, methods: list[str] = ()) -> pd.DataFrame:
    """Task order, model, dataset, length, budget (full first), method (full, then config order)."""
    order = {m: i for i, m in enumerate(methods)}
    keys = cells.assign(
        _t=cells["task"].map(lambda t: tasks.REGISTRY[t].order if t in tasks.REGISTRY else 1000),
        _b=cells["budget"].map(lambda b: -1 if b == "full" else int(b)),
        _m=cells["method"].map(lambda m: (m != "full", order.get(m, len(order)), m)),
    )
    keys = keys.sort_values(["_t", "model", "dataset", "length", "_b", "_m"], kind="stable")
    return cells.loc[keys.index].reset_index(drop=True)


# ----------------------------------------------------------------------------- studies
def study_cells(cells: pd.DataFrame, spec: dict) -> pd.DataFrame:
    """Cells whose fields are in the study's lists (a missing list means any); `full` fits any budget."""
    keep = pd.Series(True, index=cells.index)
    for field, col in (("tasks", "task"), ("models", "model"), ("datasets", "dataset"),
                       ("methods", "method"), ("lengths", "length")):
        if spec.get(field) is not None:
            keep &= cells[col].astype(str).isin([str(v) for v in spec[field]])
    if spec.get("budgets") is not None:
        keep &= cells["budget"].isin([str(b) for b in spec["budgets"]]) | (cells["method"] == "full")
    return sort_cells(cells[keep], list(spec.get("methods") or ())).dropna(axis=1, how="all")


def _tex_escape(s) -> str:
    out = str(s).replace("\\", r"\textbackslash{}")
    for ch in "&%$#_{}":
        out = out.replace(ch, "\\" + ch)
    return out.replace("~", r"\textasciitilde{}").replace("^", r"\textasciicircum{}")


def _fmt(col: str, v, scale: float = 1.0, n_resamples: float = 1000) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "--"
    if col in ("bleu_p_value", "bleu_p_ar"):  # resampling cannot resolve p below 1/n: say so, not 0
        return f"$<${1 / n_resamples:.3g}" if v < 1 / n_resamples else f"{v:.3f}"
    if col == "bleu_delta":
        return f"{v:+.2f}"
    if col in ("bleu_ci", "ppl_ci"):
        return f"[{v[0]:.3g}, {v[1]:.3g}]" if col == "ppl_ci" else f"[{v[0]:.1f}, {v[1]:.1f}]"
    if col == "perplexity" and v >= 1000:
        return f"{v:.3g}"
    return f"{v / scale:.2f}"


def study_tex(cells: pd.DataFrame, name: str) -> str:
    """Booktabs table; constant identifiers go into the caption; bold = best in its comparison block
    (same task, model, dataset, length)."""
    c = cells.copy()
    for q in QUALITY:  # random-weight models: quality numbers are not meaningful, show "--"
        if q in c and "quality_meaningful" in c:
            c.loc[~c["quality_meaningful"].astype(bool), q] = np.nan
    for col, pre in (("bleu_ci", "bleu"), ("ppl_ci", "perplexity")):
        if f"{pre}_ci_low" in c:
            c[col] = [None if pd.isna(lo) else (lo, hi) for lo, hi in zip(c[f"{pre}_ci_low"], c[f"{pre}_ci_high"])]
            if pre in c:  # no CI where the score itself is blanked (random weights)
                c.loc[c[pre].isna(), col] = None
    too_few = (c["significance"].astype(str).str.startswith("n <") if "significance" in c
               else pd.Series(False, index=c.index))
    # a cache peak over the method's byte budget is never "best" (it broke the budget)
    over = (c["cache_bytes_peak"] > c["budget_bytes"] * 1.0001 if {"cache_bytes_peak", "budget_bytes"} <= set(c)
            else pd.Series(False, index=c.index))
    ids = ["task", "model", "dataset", "length", "budget", "method"]
    fixed = [k for k in ids[:3] if len(c) and c[k].nunique() == 1]
    shown = [k for k in ids if k not in fixed]
    metrics = [(m, h, b) for m, h, b in TEX_METRICS
               if m in c and (c[m].notna().any() or (m.startswith("bleu_p") and too_few.any()))]
    scale, unit = figures.byte_unit(c["cache_bytes_peak"].max() if "cache_bytes_peak" in c else 0)
    heads = [k for k in shown] + [f"{h} ({unit})" if m == "cache_bytes_peak" else h for m, h, _ in metrics]
    ranked = c.assign(cache_bytes_peak=c["cache_bytes_peak"].where(~over)) if "cache_bytes_peak" in c else c
    block = ranked.groupby(["task", "model", "dataset", "length"], sort=False) if len(c) else None
    best = {m: block[m].transform(b) for m, _, b in metrics if b} if block is not None else {}
    lines = [f"% generated by kvbench.aggregate for study {name}; do not edit",
             r"\begin{table}[t]", r"\centering", r"\small"]
    caption = f"Study \\texttt{{{_tex_escape(name)}}}"
    caption += "".join(f"; {k}: {_tex_escape(c[k].iloc[0])}" for k in fixed)
    caption += (". Bold: best per column among rows of the same task, model, dataset and length. "
                r"95\% CI: sacreBLEU's bootstrap CI of BLEU (for perplexity, a bootstrap over documents). "
                r"$\Delta$BLEU and two-sided $p$ against \texttt{full} on the same samples: sacreBLEU's "
                r"paired bootstrap ($p_{bs}$) and approximate randomization ($p_{ar}$); "
                f"n$<${MIN_TEST_SAMPLES}: too few samples for any test to reach $p<0.05$. "
                r"$^\dagger$: cache peak above the byte budget (never bold). "
                "--: not applicable or not meaningful (random weights).")
    lines += [f"\\caption{{{caption}}}", f"\\label{{tab:{name}}}",
              r"\begin{tabular}{" + "l" * len(shown) + "r" * len(metrics) + "}", r"\toprule",
              " & ".join(_tex_escape(h) if "$" not in h and "\\" not in h else h for h in heads) + r" \\",
              r"\midrule"]
    prev = None
    for i, r in c.iterrows():
        group = tuple(r[k] for k in ("task", "model", "dataset"))
        if prev is not None and group != prev:
            lines.append(r"\midrule")
        prev = group
        cells_ = [_tex_escape(r[k]) for k in shown]
        for m, _, b in metrics:
            s = _fmt(m, r[m], scale if m == "cache_bytes_peak" else 1.0, r.get("n_resamples", 1000))
            if m.startswith("bleu_p") and too_few[i]:
                s = f"n$<${MIN_TEST_SAMPLES}"
            if m == "cache_bytes_peak" and over[i]:
                s += r"$^\dagger$"
            elif b and pd.notna(r[m]) and r[m] == best[m][i]:
                s = f"\\textbf{{{s}}}"
            cells_.append(s)
        lines.append(" & ".join(cells_) + r" \\")
    if c.empty:
        lines.append(f"\\multicolumn{{{len(shown)}}}{{c}}{{no data for this study in the current config}}" + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver
def _write_csv(df: pd.DataFrame, path: str) -> str:
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)
    return path


def figure(name: str, raw_files: list[str], out_dir: str, heads_files: list[str] = (),
           model_dirs: list[str] = (), methods: list[str] = ()) -> list[str]:
    """One figure (PDF, PNG and its data as CSV) from the raw files it needs; `methods` (the config's,
    in order) fix each method's colour across figures."""
    figures.set_methods(methods)
    if name == "heads":
        return figures.plot_heads(list(heads_files), os.path.join(out_dir, "figures"))
    if name == "training":
        return figures.plot_training(list(model_dirs), os.path.join(out_dir, "figures"))
    if name not in figures.FIGURES:
        raise ValueError(f"unknown figure {name!r}; known: {sorted(FIGURE_TASKS)}")
    if not raw_files:
        raise ValueError(f"aggregate: figure {name!r} has no raw result files to plot (existing figures untouched)")
    table = read_raw(list(raw_files))
    cells = cell_table(table.to_pandas(), n_resamples=0)  # figures need no bootstrap
    return figures.FIGURES[name](cells, os.path.join(out_dir, "figures"))


def aggregate(raw_files: list[str], config: dict, out_dir: str, heads_files: list[str] = (),
              with_figures: bool = True) -> dict:
    """Run the whole aggregation; returns {path relative to out_dir: absolute path} of every file written."""
    opts = config.get("aggregate") or {}
    figures.set_methods(config.get("methods") or ())
    if not raw_files:  # an empty aggregation would replace every table with an empty one
        raise ValueError("aggregate: no raw result files given; nothing to aggregate (existing results untouched)")
    n_resamples = opts.get("n_resamples", 1000)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 0:
        raise ValueError(f"aggregate.n_resamples must be a whole number >= 0, got {n_resamples!r}")
    if n_resamples < 1:
        warnings.warn("aggregate.n_resamples is 0: tables get no confidence intervals and no significance tests")
    table = read_raw(list(raw_files))
    written = {}
    all_path = os.path.join(out_dir, "all.parquet")
    with atomic_path(all_path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    written["all.parquet"] = all_path

    cells = cell_table(table.to_pandas(), n_resamples, int(opts.get("seed", 0)))
    written["tables/cells.csv"] = _write_csv(cells, os.path.join(out_dir, "tables", "cells.csv"))
    for name, spec in (config.get("studies") or {}).items():
        sc = study_cells(cells, spec or {})
        written[f"tables/{name}.csv"] = _write_csv(sc, os.path.join(out_dir, "tables", f"{name}.csv"))
        tex = os.path.join(out_dir, "tables", f"{name}.tex")
        atomic_write_text(tex, study_tex(sc, name))
        written[f"tables/{name}.tex"] = tex

    fig_dir = os.path.join(out_dir, "figures")
    for path in figures.write_all(cells, list(heads_files), fig_dir) if with_figures else []:
        written[os.path.relpath(path, out_dir)] = path
    return {k: os.path.abspath(v) for k, v in written.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kvbench aggregate", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", nargs="*", default=[], metavar="FILE", help="raw per-sample result Parquets")
    p.add_argument("--heads", nargs="*", default=[], metavar="FILE", help="head-profile Parquets (optional)")
    p.add_argument("--models", nargs="*", default=[], metavar="DIR",
                   help="model folders whose training_log.csv the training figure plots")
    p.add_argument("--figure", help="write only this figure (bleu, ppl, memory, latency, pareto, lagging, heads, "
                                    "training)")
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
