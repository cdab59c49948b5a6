"""Median per-token decode latency vs document length per method and budget."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Figure, register

if TYPE_CHECKING:
    import pandas as pd


def plot(cells: pd.DataFrame, out_dir: str) -> list[str]:
    """Median per-token decode latency vs length per method and budget."""
    from ._draw import lines

    return lines(cells, "latency", "decode_ms_median", name="latency", out_dir=out_dir, logy=False,
                 title="Decode latency vs document length", ylabel="decode latency, median (ms/token)")


register(Figure("latency", ("latency",), plot))
