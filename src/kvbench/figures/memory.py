"""Peak KV-cache bytes vs document length per method and budget, the budget dotted."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Figure, register

if TYPE_CHECKING:
    import pandas as pd


def plot(cells: pd.DataFrame, out_dir: str) -> list[str]:
    """Peak KV-cache bytes vs length per method and budget, with the budget as a dotted line."""
    from matplotlib.lines import Line2D

    from ._draw import byte_unit, lines

    task = next((t for t in ("translate_stream", "ppl", "latency", "translate_batch")
                 if ((cells["task"] == t) & cells["cache_bytes_peak"].notna()).any()), "translate_stream")
    scale, unit = byte_unit(cells.loc[cells["task"] == task, "cache_bytes_peak"].max())

    def draw_budget(ax, sub):
        b = sub.loc[sub["method"] != "full", "budget_bytes"].dropna()
        if b.empty:
            return []
        ax.axhline(b.max() / scale, color="grey", ls=":", lw=1.5)
        return [Line2D([], [], color="grey", ls=":", lw=1.5, label="budget (bytes)")]

    return lines(cells, task, "cache_bytes_peak", name="memory", out_dir=out_dir, scale=scale, logy=False,
                 keep=("budget_bytes",),
                 title=f"Peak KV-cache memory vs document length (task {task})",
                 ylabel=f"peak KV cache ({unit})", extra=draw_budget)


register(Figure("memory", ("translate_stream", "translate_batch", "ppl", "latency"), plot))
