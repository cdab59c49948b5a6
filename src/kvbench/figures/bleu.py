"""Streaming corpus BLEU vs document length per method and budget; the oracle batch (`full`) dashed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Figure, register

if TYPE_CHECKING:
    import pandas as pd


def plot(cells: pd.DataFrame, out_dir: str) -> list[str]:
    """Streaming corpus BLEU vs length per method and budget; oracle batch (`full`) dashed."""
    from matplotlib.lines import Line2D

    from ._draw import lines

    oracle = cells[(cells["task"] == "translate_batch") & (cells["method"] == "full") & cells["bleu"].notna()]

    def draw_oracle(ax, sub):
        if sub.empty:
            return []
        o = oracle[(oracle["model"] == sub["model"].iloc[0]) & (oracle["dataset"] == sub["dataset"].iloc[0])]
        if o.empty:
            return []
        if o["length"].nunique() == 1:  # one oracle value: a horizontal reference
            ax.axhline(o["bleu"].iloc[0], color="grey", ls="--", lw=1.5)
        else:  # the oracle was run per length: a dashed reference series
            ax.plot(o["length"], o["bleu"], color="grey", ls="--", lw=1.5)
        return [Line2D([], [], color="grey", ls="--", lw=1.5, label="oracle batch")]

    o = oracle[["model", "dataset", "method", "budget", "length", "bleu"]].assign(method="oracle batch")
    return lines(cells, "translate_stream", "bleu", name="bleu", out_dir=out_dir, logy=False,
                 title="Streaming translation quality vs document length",
                 ylabel="corpus BLEU (sacreBLEU)", extra=draw_oracle, more_data=o)


register(Figure("bleu", ("translate_stream", "translate_batch"), plot))
