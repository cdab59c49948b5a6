"""Figures for the aggregated kvbench results, one function per figure (seaborn, Agg backend).

Each `plot_*` takes the cell table of `kvbench.aggregate.cell_table` (or head-profile Parquets) and
writes {out_dir}/{name}.pdf, .png and .csv (the plotted series, for tests and CI), atomically.
A figure without data is still written, with a "no data" message inside, so Snakemake outputs exist.
Normally run through `python -m kvbench.aggregate ...`; `write_all(cells, heads_files, out_dir)`
renders every figure.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from kvbench.io import atomic_path  # noqa: E402

NO_DATA = "no data for this figure in the current config"
LENGTH_LABEL = "document length (tokens)"
HEAD_SCORES = ("retrieval", "induction", "local", "sink")


def byte_unit(max_bytes) -> tuple[float, str]:
    """(divisor, unit) that shows `max_bytes` as a number between 1 and 1024."""
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if pd.notna(max_bytes) and max_bytes >= scale:
            return float(scale), unit
    return 1.0, "B"


def _save(fig, data: pd.DataFrame, out_dir: str, name: str) -> list[str]:
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


def _no_data(title: str):
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{title}\n\n{NO_DATA}", ha="center", va="center", fontsize=12, wrap=True)
    return fig


def _themed(fn):
    def wrapper(*args, **kwargs):
        with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.1):
            return fn(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


METHODS: list[str] = []  # every method of the config, in config order (set_methods): fixes the colours
MARKERS = "osD^vP*Xph<>"


def set_methods(methods) -> None:
    """Colours come from the config's method list, so a method has one colour in every figure,
    whichever methods a figure happens to show."""
    METHODS[:] = [m for m in dict.fromkeys(methods) if m != "full"]


def _palette(cells: pd.DataFrame) -> dict:
    """One colour per method for every figure; `full` (the reference) is black."""
    others = METHODS + sorted(m for m in cells["method"].dropna().unique() if m != "full" and m not in METHODS)
    colours = sns.color_palette("tab10" if len(others) <= 10 else "husl", max(len(others), 1))
    return {"full": "black"} | dict(zip(others, colours))


def _markers(cells: pd.DataFrame) -> dict:
    pal = _palette(cells)
    return {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(pal)}


def _dodge(d: pd.DataFrame, x: str) -> pd.Series:
    """x shifted a little per method (within +-2% of the axis span), so equal series stay visible."""
    methods = _order(d["method"])
    span = (d[x].max() - d[x].min()) or max(abs(d[x].max()), 1)
    step = 0.04 * span / max(len(methods) - 1, 1)
    offset = {m: (i - (len(methods) - 1) / 2) * step for i, m in enumerate(methods)}
    return d[x] + d["method"].map(offset)


def _same_series(d: pd.DataFrame, y: str) -> dict:
    """{method: the first method (legend order) whose series in every panel is identical}, for the legend."""
    keyed = {m: tuple(map(tuple, g.sort_values(["row", "panel", "length"])[["row", "panel", "length", y]]
                                       .astype(str).values)) for m, g in d.groupby("method")}
    out, seen = {}, {}
    for m in _order(keyed):
        if keyed[m] in seen:
            out[m] = seen[keyed[m]]
        else:
            seen[keyed[m]] = m
    return out


def _order(methods) -> list[str]:
    return sorted(set(methods), key=lambda m: (m != "full", m))


def _budget_key(b: str):
    return -1 if b == "full" else int(b)


def _by_budget(d: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One panel per numeric budget, the `full` cells repeated in each panel as the reference."""
    budgets = sorted({b for b in d["budget"] if b != "full"}, key=_budget_key)
    if not budgets:
        return d.assign(panel="budget: full"), ["budget: full"]
    parts = [d[(d["budget"] == b) | (d["method"] == "full")].assign(panel=f"budget {b} tokens") for b in budgets]
    return pd.concat(parts, ignore_index=True), [f"budget {b} tokens" for b in budgets]


def _grid(d: pd.DataFrame, rows: list[str], panels: list[str], title: str, sharey=True):
    """Axes grid: one row per combination of `rows` values, one column per panel."""
    d = d.assign(row=d[rows].astype(str).agg(" / ".join, axis=1))
    row_keys = sorted(d["row"].unique())
    fig, axes = plt.subplots(len(row_keys), len(panels), squeeze=False, sharey=sharey,
                             figsize=(3.8 * len(panels) + 0.6, 3.1 * len(row_keys) + 0.7))
    fig.suptitle(title)
    out = []
    for i, rk in enumerate(row_keys):
        for j, pn in enumerate(panels):
            ax = axes[i, j]
            ax.set_title(f"{rk} | {pn}" if len(row_keys) > 1 else pn, fontsize="medium")
            out.append((ax, d[(d["row"] == rk) & (d["panel"] == pn)]))
    return fig, out


def _legend(fig, handles):
    """Legend to the right of all panels, never over the data."""
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def _method_handles(methods, palette, ls="-", markers=None, same=None):
    markers, same = markers or {}, same or {}
    return [Line2D([], [], color=palette[m], marker=markers.get(m, "o"), ls=ls,
                   label=f"{m} (same as {same[m]})" if m in same else m) for m in _order(methods)]


def _lines(cells, task, y, *, name, title, ylabel, out_dir, rows=("model", "dataset"), scale=1.0,
           logy=None, extra=None, keep=(), more_data=None):
    """Metric `y` vs length, one line per method, one panel per budget (shared by four figures)."""
    d = cells[(cells["task"] == task) & cells[y].notna()]
    if "quality_meaningful" in d and y in ("bleu", "perplexity"):
        d = d[d["quality_meaningful"].astype(bool)]
    cols = list(rows) + ["method", "budget", "length", y, *keep]
    if d.empty:
        return _save(_no_data(title), pd.DataFrame(columns=cols), out_dir, name)
    d, panels = _by_budget(d[cols])
    pal, mk = _palette(cells), _markers(cells)
    fig, grid = _grid(d, list(rows), panels, title)
    vals = d[y] / scale
    wide = logy if logy is not None else (vals.min() > 0 and vals.max() / vals.min() > 20)
    same = _same_series(d.assign(row=d[list(rows)].astype(str).agg(" / ".join, axis=1)), y)
    handles = _method_handles(d["method"], pal, markers=mk, same=same)
    x_dodged = _dodge(d, "length")
    for ax, sub in grid:
        for m in _order(sub["method"]):  # equal series are dodged apart and keep their own markers
            s_ = sub[sub["method"] == m].assign(x=x_dodged).sort_values("length")
            ax.plot(s_["x"], s_[y] / scale, color=pal[m], marker=mk[m], ms=5, lw=1.5, alpha=0.9)
        ax.set_xticks(sorted(d["length"].unique()))
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
    _legend(fig, list(uniq.values()))
    return _save(fig, pd.concat([d, more_data]) if more_data is not None else d, out_dir, name)


@_themed
def plot_bleu(cells: pd.DataFrame, out_dir: str) -> list[str]:
    """Streaming corpus BLEU vs length per method and budget; oracle batch (`full`) dashed."""
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
    return _lines(cells, "translate_stream", "bleu", name="bleu", out_dir=out_dir, logy=False,
                  title="Streaming translation quality vs document length",
                  ylabel="corpus BLEU (sacreBLEU)", extra=draw_oracle, more_data=o)


@_themed
def plot_ppl(cells: pd.DataFrame, out_dir: str) -> list[str]:
    """Perplexity vs length per method and budget (log y when the range is wide)."""
    return _lines(cells, "ppl", "perplexity", name="ppl", out_dir=out_dir,
                  title="Perplexity vs document length", ylabel="perplexity (lower is better)")


@_themed
def plot_memory(cells: pd.DataFrame, out_dir: str) -> list[str]:
    """Peak KV-cache bytes vs length per method and budget, with the budget as a dotted line."""
    task = next((t for t in ("translate_stream", "ppl", "latency", "translate_batch")
                 if ((cells["task"] == t) & cells["cache_bytes_peak"].notna()).any()), "translate_stream")
    scale, unit = byte_unit(cells.loc[cells["task"] == task, "cache_bytes_peak"].max())

    def draw_budget(ax, sub):
        b = sub.loc[sub["method"] != "full", "budget_bytes"].dropna()
        if b.empty:
            return []
        ax.axhline(b.max() / scale, color="grey", ls=":", lw=1.5)
        return [Line2D([], [], color="grey", ls=":", lw=1.5, label="budget (bytes)")]

    return _lines(cells, task, "cache_bytes_peak", name="memory", out_dir=out_dir, scale=scale, logy=False,
                  keep=("budget_bytes",),
                  title=f"Peak KV-cache memory vs document length (task {task})",
                  ylabel=f"peak KV cache ({unit})", extra=draw_budget)


@_themed
def plot_latency(cells: pd.DataFrame, out_dir: str) -> list[str]:
    """Median per-token decode latency vs length per method and budget."""
    return _lines(cells, "latency", "decode_ms_median", name="latency", out_dir=out_dir, logy=False,
                  title="Decode latency vs document length", ylabel="decode latency, median (ms/token)")


def _frontier(d: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points not dominated by one with less memory and at least as much quality."""
    d = d.sort_values([x, y], ascending=[True, False])
    return d[d[y] > d[y].cummax().shift(fill_value=float("-inf"))]


@_themed
def plot_pareto(cells: pd.DataFrame, out_dir: str) -> list[str]:
    """Streaming BLEU vs peak cache bytes: every method and budget a labelled point, per length."""
    title = "Quality vs memory (streaming translation)"
    cols = ["model", "dataset", "method", "budget", "length", "cache_bytes_peak", "bleu"]
    d = cells[(cells["task"] == "translate_stream") & cells["bleu"].notna() & cells["cache_bytes_peak"].notna()]
    d = d[d["quality_meaningful"].astype(bool)][cols]
    if d.empty:
        return _save(_no_data(title), pd.DataFrame(columns=cols), out_dir, "pareto")
    scale, unit = byte_unit(d["cache_bytes_peak"].max())
    lengths = sorted(d["length"].unique())
    d = d.assign(panel=[f"length {n} tokens" for n in d["length"]])
    pal, mk = _palette(cells), _markers(cells)
    fig, grid = _grid(d, ["model", "dataset"], [f"length {n} tokens" for n in lengths], title, sharey=False)
    for ax, sub in grid:
        if sub.empty:
            continue
        sub = sub.assign(x=sub["cache_bytes_peak"] / scale)
        front = _frontier(sub, "x", "bleu")
        ax.plot(front["x"], front["bleu"], color="lightgrey", lw=2, zorder=0)
        for m in _order(sub["method"]):
            s_ = sub[sub["method"] == m]
            ax.scatter(s_["x"], s_["bleu"], color=pal[m], marker=mk[m], s=40, alpha=0.85, zorder=2)
        for _, r in sub.iterrows():
            ax.annotate(r["budget"], (r["x"], r["bleu"]), xytext=(4, 3), textcoords="offset points",
                        fontsize="x-small")
        if sub["x"].max() > 4 * sub["x"].min():  # budgets and the full cache span octaves: log axis
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.margins(0.12)  # room for the point labels
        ax.set_xlabel(f"peak KV cache ({unit}, log scale)" if ax.get_xscale() == "log" else f"peak KV cache ({unit})")
        ax.set_ylabel("corpus BLEU (sacreBLEU)")
        ax.set_ylim(-2, 102)
    handles = _method_handles(d["method"], pal, ls="", markers=mk) + [
        Line2D([], [], color="lightgrey", lw=2, label="Pareto frontier"),
        Line2D([], [], ls="", label="point label = budget (tokens)")]
    _legend(fig, handles)
    return _save(fig, d.drop(columns="panel"), out_dir, "pareto")


@_themed
def plot_lagging(cells: pd.DataFrame, out_dir: str) -> list[str]:
    """Streaming BLEU vs average lagging per method; marker = document length."""
    title = "Quality vs lagging (streaming translation)"
    cols = ["model", "dataset", "method", "budget", "length", "al", "bleu"]
    d = cells[(cells["task"] == "translate_stream") & cells["bleu"].notna() & cells["al"].notna()]
    d = d[d["quality_meaningful"].astype(bool)][cols]
    if d.empty:
        return _save(_no_data(title), pd.DataFrame(columns=cols), out_dir, "lagging")
    d, panels = _by_budget(d)
    pal = _palette(cells)
    markers = dict(zip(sorted(d["length"].unique()), "osD^vP*Xph"))
    fig, grid = _grid(d, ["model", "dataset"], panels, title)
    for ax, sub in grid:
        if not sub.empty:
            sns.scatterplot(sub, x="al", y="bleu", hue="method", palette=pal, style="length",
                            markers=markers, s=50, legend=False, ax=ax)
        ax.margins(0.1)
        ax.set_xlabel("average lagging AL (source words)")
        ax.set_ylabel("corpus BLEU (sacreBLEU)")
        ax.set_ylim(-2, 102)
    handles = _method_handles(d["method"], pal, ls="")
    handles += [Line2D([], [], color="grey", marker=mk, ls="", label=f"length {n}") for n, mk in markers.items()]
    _legend(fig, handles)
    return _save(fig, d, out_dir, "lagging")


def _read_heads(heads_files: list[str]) -> pd.DataFrame:
    parts = []
    for path in heads_files:
        try:
            h = pd.read_parquet(path)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable head-profile Parquet ({exc})") from exc
        need = {"layer", "q_head", "kv_head", "type", *HEAD_SCORES}
        if need - set(h.columns):
            raise ValueError(f"{path}: head profile lacks columns {sorted(need - set(h.columns))}")
        parts.append(h.assign(model=os.path.splitext(os.path.basename(path))[0]))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _type_letters(types) -> dict:
    """Short unique tags for head types, shown in the heatmap cells."""
    out, used = {}, set()
    for t in sorted({str(t) for t in types}):
        n = 1
        while t[:n].upper() in used and n < len(t):
            n += 1
        out[t] = t[:n].upper()
        used.add(out[t])
    return out


@_themed
def plot_heads(heads_files: list[str], out_dir: str) -> list[str]:
    """Head profile: one heatmap per score (layers x query heads), cells tagged with the head type."""
    title = "Attention-head profile"
    h = _read_heads(list(heads_files))
    cols = ["model", "layer", "q_head", "kv_head", *HEAD_SCORES, "type"]
    if h.empty:
        return _save(_no_data(title), pd.DataFrame(columns=cols), out_dir, "heads")
    tags = _type_letters(h["type"])
    models = sorted(h["model"].unique())
    n_heads, n_layers = h["q_head"].nunique(), h["layer"].nunique()
    w, hh = max(3.2, 0.28 * n_heads + 1.8), max(2.6, 0.28 * n_layers + 1.0)
    fig, axes = plt.subplots(len(models), len(HEAD_SCORES), squeeze=False,
                             figsize=(w * len(HEAD_SCORES), hh * len(models) + 0.9))
    annotate = n_heads * n_layers <= 2500
    for i, model in enumerate(models):
        m = h[h["model"] == model]
        tag = m.assign(tag=m["type"].astype(str).map(tags)).pivot(index="layer", columns="q_head", values="tag")
        for j, score in enumerate(HEAD_SCORES):
            ax = axes[i, j]
            grid = m.pivot(index="layer", columns="q_head", values=score)
            sns.heatmap(grid, ax=ax, cmap="viridis", annot=tag.values if annotate else False, fmt="",
                        annot_kws={"fontsize": max(4, min(8, 160 / max(n_heads, n_layers)))},
                        cbar_kws={"label": f"{score} score"})
            ax.set_title(f"{model}: {score}" if len(models) > 1 else score)
            ax.set_xlabel("query head")
            ax.set_ylabel("layer")
    fig.suptitle(title)
    fig.tight_layout()
    key = ", ".join(f"{v} = {k}" for k, v in tags.items())
    fig.text(0.5, -0.01, f"cell letters: head type ({key})", ha="center", va="top")
    return _save(fig, h[cols], out_dir, "heads")


@_themed
def plot_training(model_dirs: list[str], out_dir: str) -> list[str]:
    """Loss curves of the models trained here (their `training_log.csv`): raw and a 50-step mean."""
    title = "Training loss of the builtin models"
    cols = ["model", "step", "length", "loss", "loss_mean50", "lr", "seconds"]
    logs = [(os.path.basename(os.path.normpath(d)), os.path.join(d, "training_log.csv")) for d in model_dirs]
    logs = [(m, f) for m, f in logs if os.path.exists(f)]
    if not logs:
        return _save(_no_data(title), pd.DataFrame(columns=cols), out_dir, "training")
    frames = []
    for model, f in logs:
        d = pd.read_csv(f)
        d.insert(0, "model", model)
        d["loss_mean50"] = d["loss"].rolling(50, min_periods=1).mean()
        frames.append(d)
    data = pd.concat(frames, ignore_index=True)
    fig, axes = plt.subplots(1, len(logs), squeeze=False, figsize=(6.5 * len(logs), 3.6))
    for ax, (model, _) in zip(axes[0], logs):
        d = data[data["model"] == model]
        ax.plot(d["step"], d["loss"], color="0.75", lw=0.6, label="per step")
        ax.plot(d["step"], d["loss_mean50"], color="C0", lw=1.8, label="mean of 50 steps")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("loss on target tokens (nats, log scale)")
        minutes = d["seconds"].iloc[-1] / 60
        ax.set_title(f"{model}: {len(d)} steps, {minutes:.0f} min, final mean {d['loss_mean50'].iloc[-1]:.3f}")
        ax.legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, data[cols], out_dir, "training")


FIGURES = {"bleu": plot_bleu, "ppl": plot_ppl, "memory": plot_memory, "latency": plot_latency,
           "pareto": plot_pareto, "lagging": plot_lagging}


def write_all(cells: pd.DataFrame, heads_files: list[str], out_dir: str) -> list[str]:
    """Every figure; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [p for fn in FIGURES.values() for p in fn(cells, out_dir)]
    return paths + plot_heads(heads_files, out_dir)
