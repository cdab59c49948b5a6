"""The lines a finished run prints: where the results are, and the headline of the cell table.

    python -m kvbench.summary results        (what Snakemake's onsuccess prints)

The headline: streaming-translation BLEU at the longest length of each (model, dataset), and at
each budget the method with the best BLEU, against the full cache.
"""

from __future__ import annotations

import os
import sys


def headline(cells_csv: str) -> list[str]:
    import pandas as pd

    cells = pd.read_csv(cells_csv, dtype={"budget": str})
    ts = cells[(cells["task"] == "translate_stream") & cells["bleu"].notna()]
    if "quality_meaningful" in ts:
        ts = ts[ts["quality_meaningful"].astype(str) != "False"]
    lines = []
    for (model, dataset), g in ts.groupby(["model", "dataset"], sort=True):
        length = g["length"].max()
        g = g[g["length"] == length]
        full = g[g["method"] == "full"]["bleu"]
        ref = f"full {full.iloc[0]:.1f}" if len(full) else "no full-cache cell"
        lines.append(f"headline ({model}, {dataset}, streaming translation at {length} tokens, BLEU; {ref}):")
        evict = g[g["budget"] != "full"]
        for budget in sorted(evict["budget"].unique(), key=int):
            b = evict[evict["budget"] == budget].sort_values(["bleu", "method"], ascending=[False, True])
            best = b.iloc[0]
            delta = f", {best['bleu'] - full.iloc[0]:+.1f} vs full" if len(full) else ""
            ci = (f" [95% CI {best['bleu_ci_low']:.1f}-{best['bleu_ci_high']:.1f}]"
                  if "bleu_ci_low" in b and pd.notna(best.get("bleu_ci_low")) else "")
            lines.append(f"  B={budget}: best {best['method']} {best['bleu']:.1f}{ci}{delta} "
                         f"(of {len(b)} methods)")
    return lines


def where(results: str = "results") -> list[str]:
    lines = [f"figures:       {os.path.join(results, 'figures')}/ (PDF, PNG and the plotted data as CSV)",
             f"summary table: {os.path.join(results, 'tables', 'cells.csv')} (one row per cell; per study: "
             f"{os.path.join(results, 'tables')}/<study>.csv|.tex)"]
    report = os.path.join(results, "report.html")
    lines.append(f"report:        {report}" + ("" if os.path.exists(report) else
                                               f" (make it with: snakemake --report {report})"))
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results = argv[0] if argv else "results"
    out = where(results)
    cells = os.path.join(results, "tables", "cells.csv")
    if os.path.exists(cells):
        out += headline(cells)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
