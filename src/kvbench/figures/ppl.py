"""Perplexity vs document length per method and budget (log y when the range is wide)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Figure, register

if TYPE_CHECKING:
    import pandas as pd


def plot(cells: pd.DataFrame, out_dir: str) -> list[str]:
    """Perplexity vs length per method and budget (log y when the range is wide)."""
    from ._draw import lines

    return lines(cells, "ppl", "perplexity", name="ppl", out_dir=out_dir,
                 title="Perplexity vs document length", ylabel="perplexity (lower is better)")


register(Figure("ppl", ("ppl",), plot))
