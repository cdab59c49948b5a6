"""The attention-head profile: one heatmap per score (layers x query heads) per profiled model, each
cell tagged with the head type (reads results/heads/{model}.parquet)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import Figure, register

if TYPE_CHECKING:
    import pandas as pd

HEAD_SCORES = ("retrieval", "induction", "local", "sink")


def _read_heads(heads_files: list[str]) -> pd.DataFrame:
    import pandas as pd

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


def plot(heads_files: list[str], out_dir: str) -> list[str]:
    """Head profile: one heatmap per score (layers x query heads), cells tagged with the head type."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    from ._draw import no_data, save

    title = "Attention-head profile"
    h = _read_heads(list(heads_files))
    cols = ["model", "layer", "q_head", "kv_head", *HEAD_SCORES, "type"]
    if h.empty:
        return save(no_data(title), pd.DataFrame(columns=cols), out_dir, "heads")
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
    return save(fig, h[cols], out_dir, "heads")


register(Figure("heads", (), plot, reads="heads"))
