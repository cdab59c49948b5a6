"""Cells: raw per-sample rows -> one row per (model, task, dataset, method, length, budget).

A cell's task scores come from its registered task (`kvbench.tasks`: corpus BLEU/chrF and lagging for
translation, perplexity, decode latency, accuracy of the long-context tasks), with bootstrap CIs and, for a compressed cell, the task's
paired tests against the `full` cell of the same samples; memory, provenance and the derived metrics
against `full` (speedup, compression, perplexity increase) are the same for every task.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kvbench import tasks
from kvbench.schema import ARROW_SCHEMA, COLUMNS, SchemaError, check_version, missing_ok

KEYS = ["model", "task", "dataset", "method", "length", "budget"]
CELL_COLUMNS = KEYS + [
    "n_samples", "bleu", "chrf", "al", "laal", "lagging_skipped", "perplexity", "decode_ms_median",
    "decode_ms_p90", "cache_bytes_peak", "cache_bytes_mean", "transient_bytes_peak", "retained_tokens_mean",
    "budget_bytes", "budget_tokens", "layout", "compute", "method_type", "wall_seconds",
    "max_position", "model_max_positions", "quality_meaningful", "bleu_ci_low", "bleu_ci_high", "chrf_ci_low",
    "chrf_ci_high", "perplexity_ci_low", "perplexity_ci_high", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
    "score", "score_ci_low", "score_ci_high", "metric",
    "bleu_delta", "bleu_p_value", "bleu_p_ar",
    "significance", "n_paired", "n_resamples", "speedup_vs_full", "compression_vs_full",
    "ppl_increase_pct", "bleu_signature", "chrf_signature"]


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
        transient_bytes_peak=g["transient_bytes_peak"].max(),
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
    return sort_cells(pd.DataFrame(rows, columns=CELL_COLUMNS))


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
