"""Shared drawing for the figures (seaborn, Agg backend): saving PDF/PNG/CSV atomically, the "no data"
panel, one colour and marker per method across figures, panels per budget, and `lines` (a metric vs
document length, one line per method, one panel per budget) that several figures are made of."""

from __future__ import annotations

import contextlib
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator

from kvbench.io import atomic_path

NO_DATA = "no data for this figure in the current config"
LENGTH_LABEL = "document length (tokens)"


def byte_unit(max_bytes) -> tuple[float, str]:
    """(divisor, unit) that shows `max_bytes` as a number between 1 and 1024."""
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if pd.notna(max_bytes) and max_bytes >= scale:
            return float(scale), unit
    return 1.0, "B"


def save(fig, data: pd.DataFrame, out_dir: str, name: str) -> list[str]:
    paths = []
    for ext in ("pdf", "png"):
        path = os.path.join(out_dir, f"{name}.{ext}")
        meta = {"CreationDate": None} if ext == "pdf" else {}  # byte-stable reruns
        with atomic_path(path, suffix="." + ext) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight", metadata=meta)
        paths.append(path)
    plt.close(fig)
    path = os.path.join(out_dir, f"{name}.csv")
    with atomic_path(path, suffix=".csv") as tmp:
        data.to_csv(tmp, index=False)
    return paths + [path]


def no_data(title: str):
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{title}\n\n{NO_DATA}", ha="center", va="center", fontsize=12, wrap=True)
    return fig


@contextlib.contextmanager
def theme():
    """The look of every figure."""
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.1):
        yield


METHODS: list[str] = []  # every method of the config, in config order (set_methods): fixes the colours
MARKERS = "osD^vP*Xph<>"


def set_methods(methods) -> None:
    """Colours come from the config's method list, so a method has one colour in every figure,
    whichever methods a figure happens to show."""
    METHODS[:] = [m for m in dict.fromkeys(methods) if m != "full"]


def palette(cells: pd.DataFrame) -> dict:
    """One colour per method for every figure; `full` (the reference) is black."""
    others = METHODS + sorted(m for m in cells["method"].dropna().unique() if m != "full" and m not in METHODS)
    colours = sns.color_palette("tab10" if len(others) <= 10 else "husl", max(len(others), 1))
    return {"full": "black"} | dict(zip(others, colours))


def markers(cells: pd.DataFrame) -> dict:
    pal = palette(cells)
    return {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(pal)}


def geometric(lengths) -> bool:
    """Whether a length axis is drawn in log2 scale: lengths spanning 4x or more (256-1024, or the
    paper's 2000-20000), where a linear axis crowds the short ones together."""
    vals = [float(x) for x in pd.Series(lengths).dropna().unique()]
    return len(vals) > 1 and min(vals) > 0 and max(vals) / min(vals) >= 4


def dodge(d: pd.DataFrame, x: str) -> pd.Series:
    """x shifted a little per method (within +-2% of the axis span), so equal series stay visible; on
    a log2 axis (`geometric` x, as `length_axis` draws it) the shift is a factor, the same width everywhere."""
    methods = method_order(d["method"])
    log = geometric(d[x])
    v = np.log2(d[x].astype(float)) if log else d[x]
    span = (v.max() - v.min()) or max(abs(v.max()), 1)
    step = 0.04 * span / max(len(methods) - 1, 1)
    offset = d["method"].map({m: (i - (len(methods) - 1) / 2) * step for i, m in enumerate(methods)})
    return np.exp2(v + offset) if log else v + offset


def length_axis(ax, lengths, fontsize=None, min_gap: float = 0.12) -> None:
    """Ticks at every length, labelled where the labels fit: log2 scale for `geometric` lengths, and
    a label dropped when it would sit within `min_gap` of the axis span of the previous one (the last
    length always labelled), so 4096 and 5000, or 410 and 500, do not print over each other."""
    vals = sorted({int(x) for x in pd.Series(lengths).dropna()})
    log = geometric(vals)
    if log:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_locator(NullLocator())
    pos = [math.log2(x) if log else float(x) for x in vals]
    span = (pos[-1] - pos[0]) or 1.0
    show, last = [False] * len(vals), None
    for i in range(len(vals)):
        if last is None or pos[i] - pos[last] >= min_gap * span:
            show[i], last = True, i
    if len(vals) > 1 and not show[-1]:  # the longest is labelled; the label crowding it goes
        show[-1], show[last] = True, last == 0
    ax.set_xticks(vals, [str(x) if s else "" for x, s in zip(vals, show)], fontsize=fontsize)


def same_series(d: pd.DataFrame, y: str) -> dict:
    """{method: the first method (legend order) whose series in every panel is identical}, for the legend."""
    keyed = {m: tuple(map(tuple, g.sort_values(["row", "panel", "length"])[["row", "panel", "length", y]]
                                       .astype(str).values)) for m, g in d.groupby("method")}
    out, seen = {}, {}
    for m in method_order(keyed):
        if keyed[m] in seen:
            out[m] = seen[keyed[m]]
        else:
            seen[keyed[m]] = m
    return out


def method_order(methods) -> list[str]:
    return sorted(set(methods), key=lambda m: (m != "full", m))


def budget_key(b: str):
    return -1 if b == "full" else int(b)


def by_budget(d: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One panel per numeric budget, the `full` cells repeated in each panel as the reference."""
    budgets = sorted({b for b in d["budget"] if b != "full"}, key=budget_key)
    if not budgets:
        return d.assign(panel="budget: full"), ["budget: full"]
    parts = [d[(d["budget"] == b) | (d["method"] == "full")].assign(panel=f"budget {b} tokens") for b in budgets]
    return pd.concat(parts, ignore_index=True), [f"budget {b} tokens" for b in budgets]


def panel_grid(d: pd.DataFrame, rows: list[str], panels: list[str], title: str, sharey=True):
    """Axes grid: one row per combination of `rows` values, one column per panel."""
    d = d.assign(row=d[rows].astype(str).agg(" / ".join, axis=1))
    row_keys = sorted(d["row"].unique())
    fig, axes = plt.subplots(len(row_keys), len(panels), squeeze=False, sharey=sharey,
                             figsize=(3.8 * len(panels) + 0.6, 3.1 * len(row_keys) + 0.7))
    suptitle(fig, title)
    out = []
    for i, rk in enumerate(row_keys):
        for j, pn in enumerate(panels):
            ax = axes[i, j]
            ax.set_title(f"{rk} | {pn}" if len(row_keys) > 1 else pn, fontsize="medium")
            out.append((ax, d[(d["row"] == rk) & (d["panel"] == pn)]))
    return fig, out


def suptitle(fig, title: str) -> None:
    """The figure's title a fixed 0.08 in below the top edge (matplotlib's default, 2% of the height,
    put it over the first row of a tall figure); legend() keeps the panels below it."""
    fig.suptitle(title, y=1 - 0.08 / fig.get_figheight(), va="top")


def legend(fig, handles):
    """Legend to the right of all panels, never over the data; the panels below the title."""
    title = fig._suptitle
    top = 1 - (0.1 + title.get_fontsize() / 72 * 1.25) / fig.get_figheight() if title and title.get_text() else 1
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def method_handles(methods, palette, ls="-", markers=None, same=None):
    markers, same = markers or {}, same or {}
    return [Line2D([], [], color=palette[m], marker=markers.get(m, "o"), ls=ls,
                   label=f"{m} (same as {same[m]})" if m in same else m) for m in method_order(methods)]


def lines(cells, task, y, *, name, title, ylabel, out_dir, rows=("model", "dataset"), scale=1.0,
           logy=None, extra=None, keep=(), more_data=None):
    """Metric `y` vs length, one line per method, one panel per budget (shared by four figures)."""
    d = cells[(cells["task"] == task) & cells[y].notna()]
    if "quality_meaningful" in d and y in ("bleu", "perplexity"):
        d = d[d["quality_meaningful"].astype(bool)]
    cols = list(rows) + ["method", "budget", "length", y, *keep]
    if d.empty:
        return save(no_data(title), pd.DataFrame(columns=cols), out_dir, name)
    d, panels = by_budget(d[cols])
    pal, mk = palette(cells), markers(cells)
    fig, grid = panel_grid(d, list(rows), panels, title)
    vals = d[y] / scale
    wide = logy if logy is not None else (vals.min() > 0 and vals.max() / vals.min() > 20)
    same = same_series(d.assign(row=d[list(rows)].astype(str).agg(" / ".join, axis=1)), y)
    handles = method_handles(d["method"], pal, markers=mk, same=same)
    x_dodged = dodge(d, "length")
    for ax, sub in grid:
        for m in method_order(sub["method"]):  # equal series are dodged apart and keep their own markers
            s_ = sub[sub["method"] == m].assign(x=x_dodged).sort_values("length")
            ax.plot(s_["x"], s_[y] / scale, color=pal[m], marker=mk[m], ms=5, lw=1.5, alpha=0.9)
        length_axis(ax, d["length"])
        ax.set_xlabel(LENGTH_LABEL)
        ax.set_ylabel(ylabel)
        if wide:
            ax.set_yscale("log")
        elif y == "bleu":  # the whole BLEU scale: a 0.01 gap must not look like a cliff
            ax.set_ylim(-2, 102)
        else:  # linear amounts (bytes, ms) start at zero
            ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], float(vals.max()) * 1.08))
        if extra is not None:
            handles += extra(ax, sub)
    uniq = {h.get_label(): h for h in handles}
    legend(fig, list(uniq.values()))
    return save(fig, pd.concat([d, more_data]) if more_data is not None else d, out_dir, name)
