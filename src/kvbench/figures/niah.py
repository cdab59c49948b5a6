"""Needle in a haystack: accuracy by needle depth x document length, one annotated heatmap per (method,
budget), and a summary panel (accuracy vs length, one line per method and budget). Reads the raw rows
(depth lives within a cell); one row of panels per (model, dataset, question placement)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Figure, register

if TYPE_CHECKING:
    import pandas as pd

TITLE = "Needle in a haystack: accuracy by depth and length"


def table(rows: pd.DataFrame) -> pd.DataFrame:
    """Accuracy and sample count per (model, dataset, query_first, method, budget, length, depth)."""
    d = rows[(rows["task"] == "niah") & rows["score"].notna()]
    if "quality_meaningful" in d:
        d = d[d["quality_meaningful"] != False]  # noqa: E712 - null means "not marked"
    keys = ["model", "dataset", "query_first", "method", "budget", "length", "depth"]
    return (d.assign(query_first=d["query_first"].fillna(False).astype(bool))
            .groupby(keys, dropna=False)["score"].agg(accuracy="mean", n="size").reset_index())


def plot(rows: pd.DataFrame, out_dir: str) -> list[str]:
    import matplotlib.pyplot as plt
    import pandas as pd

    from ._draw import (LENGTH_LABEL, budget_key, dodge, legend, length_axis, markers, method_order, no_data, palette,
                        save, suptitle)

    t = table(rows)
    if t.empty:
        return save(no_data(TITLE), t, out_dir, "niah")
    t = t.assign(row=t["model"].astype(str) + " / " + t["dataset"].astype(str)
                 + t["query_first"].map({True: " / question first", False: ""}))
    t = t.assign(panel=t["method"] + t["budget"].map(lambda b: "" if b == "full" else f" @ {b}"))
    panels = sorted(t[["method", "budget", "panel"]].drop_duplicates().itertuples(index=False),
                    key=lambda p: (budget_key(p.budget), method_order(t["method"]).index(p.method)))
    row_keys = sorted(t["row"].unique())
    lengths = sorted(t["length"].unique())
    depths = sorted(t["depth"].unique())
    ncol = len(panels) + 2  # the heatmaps, their colour bar, the summary
    fig, axes = plt.subplots(len(row_keys), ncol, squeeze=False,
                             gridspec_kw={"width_ratios": [1] * len(panels) + [0.06, 1.2]},
                             figsize=(0.55 * len(lengths) * len(panels) + 1.2 * len(panels) + 5.0,
                                      0.3 * len(depths) * len(row_keys) + 1.8 * len(row_keys) + 0.6))
    suptitle(fig, TITLE)
    pal, mk = palette(t), markers(t)
    for i, rk in enumerate(row_keys):
        sub = t[t["row"] == rk]
        for j, p in enumerate(panels):
            ax = axes[i, j]
            g = sub[sub["panel"] == p.panel]
            grid = (g.pivot_table(index="depth", columns="length", values="accuracy")
                    .reindex(index=depths, columns=lengths))
            image = ax.imshow(grid.values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
            for (yi, xi), v in pd.DataFrame(grid.values).stack().items():
                ax.text(xi, yi, f"{v:.2f}", ha="center", va="center", fontsize="x-small",
                        color="black" if 0.2 < v < 0.8 else "white")
            ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize="x-small")
            ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths] if j == 0 else [],
                          fontsize="x-small")
            ax.grid(False)
            ax.set_title(p.panel if len(row_keys) == 1 else f"{rk}\n{p.panel}", fontsize="small")
            ax.set_xlabel("length", fontsize="small")
            if j == 0:
                ax.set_ylabel("needle depth", fontsize="small")
        fig.colorbar(image, cax=axes[i, -2], label="accuracy")
        ax = axes[i, -1]  # summary: accuracy vs length, one line per method and budget
        summ = (sub.assign(hits=sub["accuracy"] * sub["n"]).groupby(["method", "budget", "panel", "length"])
                [["hits", "n"]].sum().reset_index())
        summ = summ.assign(accuracy=summ["hits"] / summ["n"])
        summ = summ.assign(x=dodge(summ, "length"))  # equal lines stay visible side by side
        for p in panels:
            s_ = summ[summ["panel"] == p.panel].sort_values("length")
            ax.plot(s_["x"], s_["accuracy"], color=pal.get(p.method, "grey"), marker=mk.get(p.method, "o"), ms=4,
                    ls="-" if p.budget == "full" or p.budget == panels[-1].budget else "--", label=p.panel)
        ax.set_ylim(-0.05, 1.05)
        length_axis(ax, lengths, fontsize="x-small")
        ax.set_xlabel(LENGTH_LABEL, fontsize="small")
        ax.set_ylabel("accuracy (all depths)", fontsize="small")
        ax.set_title("summary", fontsize="small")
    handles, _ = axes[0, -1].get_legend_handles_labels()
    legend(fig, handles)
    return save(fig, t.drop(columns=["row", "panel"]), out_dir, "niah")


register(Figure("niah", ("niah",), plot, reads="rows"))
