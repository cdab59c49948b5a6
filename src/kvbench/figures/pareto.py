"""Quality vs memory: streaming BLEU vs peak KV-cache bytes, every method and budget a point (each
budget labelled once, at its best point: its methods hold the same bytes), one panel per length, the
Pareto frontier in grey."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Figure, register

if TYPE_CHECKING:
    import pandas as pd


def _frontier(d: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points not dominated by one with less memory and at least as much quality."""
    d = d.sort_values([x, y], ascending=[True, False])
    return d[d[y] > d[y].cummax().shift(fill_value=float("-inf"))]


def plot(cells: pd.DataFrame, out_dir: str) -> list[str]:
    """Streaming BLEU vs peak cache bytes: every method and budget a labelled point, per length."""
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib.lines import Line2D

    from ._draw import byte_unit, legend, markers, method_handles, method_order, no_data, palette, panel_grid, save

    title = "Quality vs memory (streaming translation)"
    cols = ["model", "dataset", "method", "budget", "length", "cache_bytes_peak", "bleu"]
    d = cells[(cells["task"] == "translate_stream") & cells["bleu"].notna() & cells["cache_bytes_peak"].notna()]
    d = d[d["quality_meaningful"].astype(bool)][cols]
    if d.empty:
        return save(no_data(title), pd.DataFrame(columns=cols), out_dir, "pareto")
    scale, unit = byte_unit(d["cache_bytes_peak"].max())
    lengths = sorted(d["length"].unique())
    d = d.assign(panel=[f"length {n} tokens" for n in d["length"]])
    pal, mk = palette(cells), markers(cells)
    fig, grid = panel_grid(d, ["model", "dataset"], [f"length {n} tokens" for n in lengths], title, sharey=False)
    for ax, sub in grid:
        if sub.empty:
            continue
        sub = sub.assign(x=sub["cache_bytes_peak"] / scale)
        front = _frontier(sub, "x", "bleu")
        ax.plot(front["x"], front["bleu"], color="lightgrey", lw=2, zorder=0)
        for m in method_order(sub["method"]):
            s_ = sub[sub["method"] == m]
            ax.scatter(s_["x"], s_["bleu"], color=pal[m], marker=mk[m], s=40, alpha=0.85, zorder=2)
        for _, g in sub.groupby("budget"):  # a budget's points share its bytes: one label, at its best point
            r = g.loc[g["bleu"].idxmax()]
            ax.annotate(r["budget"], (r["x"], r["bleu"]), xytext=(4, 3), textcoords="offset points",
                        fontsize="x-small")
        if sub["x"].max() > 4 * sub["x"].min():  # budgets and the full cache span octaves: log axis
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.margins(0.12)  # room for the point labels
        ax.set_xlabel(f"peak KV cache ({unit}, log scale)" if ax.get_xscale() == "log" else f"peak KV cache ({unit})")
        ax.set_ylabel("corpus BLEU (sacreBLEU)")
        ax.set_ylim(-2, 102)
    handles = method_handles(d["method"], pal, ls="", markers=mk) + [
        Line2D([], [], color="lightgrey", lw=2, label="Pareto frontier"),
        Line2D([], [], ls="", label="label = budget (tokens), at its best point")]
    legend(fig, handles)
    return save(fig, d.drop(columns="panel"), out_dir, "pareto")


register(Figure("pareto", ("translate_stream",), plot))
