"""Streaming BLEU vs average lagging (AL) per method; marker = document length."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Figure, register

if TYPE_CHECKING:
    import pandas as pd


def plot(cells: pd.DataFrame, out_dir: str) -> list[str]:
    """Streaming BLEU vs average lagging per method; marker = document length."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.lines import Line2D

    from ._draw import by_budget, legend, method_handles, no_data, palette, panel_grid, save

    title = "Quality vs lagging (streaming translation)"
    cols = ["model", "dataset", "method", "budget", "length", "al", "bleu"]
    d = cells[(cells["task"] == "translate_stream") & cells["bleu"].notna() & cells["al"].notna()]
    d = d[d["quality_meaningful"].astype(bool)][cols]
    if d.empty:
        return save(no_data(title), pd.DataFrame(columns=cols), out_dir, "lagging")
    d, panels = by_budget(d)
    pal = palette(cells)
    markers = dict(zip(sorted(d["length"].unique()), "osD^vP*Xph"))
    fig, grid = panel_grid(d, ["model", "dataset"], panels, title)
    for ax, sub in grid:
        if not sub.empty:
            sns.scatterplot(sub, x="al", y="bleu", hue="method", palette=pal, style="length",
                            markers=markers, s=50, legend=False, ax=ax)
        ax.margins(0.1)
        ax.set_xlabel("average lagging AL (source words)")
        ax.set_ylabel("corpus BLEU (sacreBLEU)")
        ax.set_ylim(-2, 102)
    handles = method_handles(d["method"], pal, ls="")
    handles += [Line2D([], [], color="grey", marker=mk, ls="", label=f"length {n}") for n, mk in markers.items()]
    legend(fig, handles)
    return save(fig, d, out_dir, "lagging")


register(Figure("lagging", ("translate_stream",), plot))
