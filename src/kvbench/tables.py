"""Study tables as LaTeX (booktabs): constant identifiers in the caption, bold = best in its comparison
block (same task, model, dataset, length), CIs and paired p-values against `full`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from kvbench.stats import MIN_TEST_SAMPLES

QUALITY = ("bleu", "chrf", "perplexity", "accuracy", "score")  # blanked in .tex when quality_meaningful is False
# (cell column, .tex header, "max"/"min" = which value is best and bold, None = never bold)
TEX_METRICS = [
    ("bleu", "BLEU", "max"), ("bleu_ci", r"95\% CI", None), ("chrf", "chrF", "max"),
    ("bleu_delta", r"$\Delta$BLEU", None), ("bleu_p_value", "$p_{bs}$", None), ("bleu_p_ar", "$p_{ar}$", None),
    ("al", "AL", "min"), ("laal", "LAAL", "min"), ("perplexity", "PPL", "min"), ("ppl_ci", r"95\% CI", None),
    ("ppl_increase_pct", r"PPL +\%", None), ("accuracy", "acc.", "max"), ("acc_ci", r"95\% CI", None),
    ("score", "score", "max"), ("score_ci", r"95\% CI", None),
    ("decode_ms_median", "ms/tok (med.)", "min"), ("decode_ms_p90", "ms/tok (p90)", "min"),
    ("speedup_vs_full", "speedup", None), ("compression_vs_full", "compr.", None),
    ("cache_bytes_peak", "cache peak", "min"),
]


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
    if col in ("acc_ci", "score_ci"):
        return f"[{v[0]:.2f}, {v[1]:.2f}]"
    if col in ("bleu_ci", "ppl_ci"):
        return f"[{v[0]:.3g}, {v[1]:.3g}]" if col == "ppl_ci" else f"[{v[0]:.1f}, {v[1]:.1f}]"
    if col == "perplexity" and v >= 1000:
        return f"{v:.3g}"
    return f"{v / scale:.2f}"


def _blank(cells: pd.DataFrame) -> pd.DataFrame:
    """Quality of random-weight models blanked (not meaningful); CIs as (low, high) pairs."""
    c = cells.copy()
    for q in QUALITY:
        if q in c and "quality_meaningful" in c:
            c.loc[~c["quality_meaningful"].astype(bool), q] = np.nan
    for col, pre in (("bleu_ci", "bleu"), ("ppl_ci", "perplexity"), ("acc_ci", "accuracy"), ("score_ci", "score")):
        if f"{pre}_ci_low" in c:
            c[col] = [None if pd.isna(lo) else (lo, hi) for lo, hi in zip(c[f"{pre}_ci_low"], c[f"{pre}_ci_high"])]
            if pre in c:  # no CI where the score itself is blanked (random weights)
                c.loc[c[pre].isna(), col] = None
    return c


def _caption(name: str, c: pd.DataFrame, fixed: list[str]) -> str:
    caption = f"Study \\texttt{{{_tex_escape(name)}}}"
    caption += "".join(f"; {k}: {_tex_escape(c[k].iloc[0])}" for k in fixed)
    return caption + (". Bold: best per column among rows of the same task, model, dataset and length. "
                      r"95\% CI: sacreBLEU's bootstrap CI of BLEU (for perplexity, a bootstrap over documents). "
                      r"$\Delta$BLEU and two-sided $p$ against \texttt{full} on the same samples: sacreBLEU's "
                      r"paired bootstrap ($p_{bs}$) and approximate randomization ($p_{ar}$); "
                      f"n$<${MIN_TEST_SAMPLES}: too few samples for any test to reach $p<0.05$. "
                      r"$^\dagger$: cache peak above the byte budget (never bold). "
                      "--: not applicable or not meaningful (random weights).")


def study_tex(cells: pd.DataFrame, name: str) -> str:
    """Booktabs table; constant identifiers go into the caption; bold = best in its comparison block
    (same task, model, dataset, length)."""
    from kvbench.figures._draw import byte_unit

    c = _blank(cells)
    too_few = (c["significance"].astype(str).str.startswith("n <") if "significance" in c
               else pd.Series(False, index=c.index))
    # a cache peak over the method's byte budget is never "best" (it broke the budget)
    over = (c["cache_bytes_peak"] > c["budget_bytes"] * 1.0001 if {"cache_bytes_peak", "budget_bytes"} <= set(c)
            else pd.Series(False, index=c.index))
    ids = ["task", "model", "dataset", "length", "budget", "method"]
    if "metric" in c and c["metric"].notna().any():  # the benchmarks' score: name its metric
        ids.insert(3, "metric")
        c["metric"] = c["metric"].fillna("--")
    fixed = [k for k in ids[:4 if "metric" in ids else 3] if len(c) and c[k].nunique() == 1]
    shown = [k for k in ids if k not in fixed]
    metrics = [(m, h, b) for m, h, b in TEX_METRICS
               if m in c and (c[m].notna().any() or (m.startswith("bleu_p") and too_few.any()))]
    scale, unit = byte_unit(c["cache_bytes_peak"].max() if "cache_bytes_peak" in c else 0)
    heads = [k for k in shown] + [f"{h} ({unit})" if m == "cache_bytes_peak" else h for m, h, _ in metrics]
    ranked = c.assign(cache_bytes_peak=c["cache_bytes_peak"].where(~over)) if "cache_bytes_peak" in c else c
    block = ranked.groupby(["task", "model", "dataset", "length"], sort=False) if len(c) else None
    best = {m: block[m].transform(b) for m, _, b in metrics if b} if block is not None else {}
    lines = [f"% generated by kvbench.aggregate for study {name}; do not edit",
             r"\begin{table}[t]", r"\centering", r"\small",
             f"\\caption{{{_caption(name, c, fixed)}}}", f"\\label{{tab:{name}}}",
             r"\begin{tabular}{" + "l" * len(shown) + "r" * len(metrics) + "}", r"\toprule",
             " & ".join(_tex_escape(h) if "$" not in h and "\\" not in h else h for h in heads) + r" \\",
             r"\midrule"]
    prev = None
    for i, r in c.iterrows():
        group = tuple(r[k] for k in ("task", "model", "dataset"))
        if prev is not None and group != prev:
            lines.append(r"\midrule")
        prev = group
        lines.append(" & ".join([_tex_escape(r[k]) for k in shown] + [
            _tex_cell(m, b, r, scale, too_few[i], over[i], best[m][i] if m in best else None) for m, _, b in metrics]) + r" \\")
    if c.empty:
        lines.append(f"\\multicolumn{{{len(shown)}}}{{c}}{{no data for this study in the current config}}" + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def _tex_cell(m: str, b, r, scale: float, too_few: bool, over: bool, best) -> str:
    """One metric of one row: formatted, marked (too few samples, over budget) or bold if best."""
    s = _fmt(m, r[m], scale if m == "cache_bytes_peak" else 1.0, r.get("n_resamples", 1000))
    if m.startswith("bleu_p") and too_few:
        s = f"n$<${MIN_TEST_SAMPLES}"
    if m == "cache_bytes_peak" and over:
        s += r"$^\dagger$"
    elif b and pd.notna(r[m]) and r[m] == best:
        s = f"\\textbf{{{s}}}"
    return s
