"""Aggregation end to end on synthetic raw results: tables, study selection, bold best, figures, refusals.

    PYTHONPATH=src python -m pytest -q tests/test_aggregate.py

The raw Parquets are built at run time with `schema.to_table` (one file per eval job, as the pipeline
writes them): model `tiny`, dataset `synth`, methods `full` and `sink4` (budgets 64 and 128),
lengths 512 and 1024, four samples per cell, tasks translate_stream/translate_batch/ppl/latency.
"""

from __future__ import annotations

import math
import os
import random
import re

import pandas as pd
import pyarrow.parquet as pq
import pytest

from kvbench import aggregate as agg
from kvbench import figures, schema
from kvbench.figures import _draw

WORDS = ("the cat sat on mat while a dog ran across green field under bright sky and birds sang "
         "loudly near old river bank where children played with small boats").split()
N_SAMPLES, LENGTHS = 8, (512, 1024)  # >= stats.MIN_TEST_SAMPLES: the paired tests run
LAYERS, KV_HEADS, HEAD_DIM = 4, 2, 16
CONFIG = {
    "aggregate": {"n_resamples": 200, "seed": 0},
    "studies": {
        "long": {"tasks": ["translate_stream"], "models": ["tiny"], "datasets": ["synth"],
                 "methods": ["full", "sink4"], "lengths": [512, 1024], "budgets": [64]},
        "budgets": {"tasks": ["translate_stream", "ppl"], "models": ["tiny"], "datasets": ["synth"],
                    "methods": ["sink4"], "lengths": [1024], "budgets": [64, 128]},
        "latency": {"tasks": ["latency"], "models": ["tiny"], "datasets": ["synth"],
                    "methods": ["full", "sink4"], "lengths": [512, 1024], "budgets": ["full", 64]},
    },
}


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _hypothesis(ref: str, rng: random.Random, error: float) -> str:
    """Corrupt a fraction `error` of the reference's words."""
    return " ".join(rng.choice(WORDS) if rng.random() < error else w for w in ref.split())


def _rows(task: str, method: str, length: int, budget: str) -> list[dict]:
    rng = random.Random(f"{task}-{method}-{length}-{budget}")
    full = method == "full"
    b = None if full else int(budget)
    held = length if full else min(b, length)
    per_token = LAYERS * KV_HEADS * HEAD_DIM * 2 * 2  # K and V, fp16
    # compression hurts more with longer documents and smaller budgets
    error = 0.05 if full else 0.05 + 0.1 * (length / 512) * (64 / b)
    rows = []
    for sid in range(N_SAMPLES):
        row = dict(
            schema_version=schema.SCHEMA_VERSION, model="tiny", model_source="builtin:tiny", revision="abc",
            task=task, dataset="synth", method=method, method_type="full" if full else "streaming_llm",
            method_params="{}" if full else '{"n_sink": 4}', method_repr=f"{method}()", length=length,
            budget=budget, budget_tokens=b, sample_id=sid, quality_meaningful=True,
            tokens_processed=length, max_position=length if full else min(length, b), model_max_positions=4096,
            retained_tokens_peak=held, retained_tokens_mean=held * 0.8,
            cache_bytes_peak=held * per_token + 256 * (not full), cache_bytes_mean=held * per_token * 0.7,
            budget_bytes=None if full else b * per_token, layout="dense" if full else "grouped_per_head",
            compute="exact", wall_seconds=0.5 + length / 1000 + rng.random() * 0.1, seed=0, device="cpu",
            dtype="float32", transient_bytes_peak=0,
        )
        if task.startswith("translate"):
            doc = random.Random(f"doc-{length}-{sid}")  # same documents for every method
            ref, src = _sentence(doc, 12 + sid), _sentence(doc, 12 + sid)
            k = 3 if task == "translate_stream" else 10**9
            row.update(source=src, reference=ref,
                       hypothesis=_hypothesis(ref, rng, 0.02 if task == "translate_batch" else error),
                       al=float(min(k, 12) + rng.random()), laal=float(min(k, 12) + 0.3 + rng.random()))
        elif task == "ppl":
            n = length - 1
            row.update(nll_sum=n * (2.0 + (0 if full else 0.2 * 64 / b)) + sid, n_scored_tokens=n)
            row["nll_per_token"] = row["nll_sum"] / n
        else:
            ms = 4.0 + (length / 512 if full else 0.5)
            row.update(decode_ms_median=ms + 0.1 * sid, decode_ms_p90=ms * 1.3 + 0.1 * sid)
        rows.append(row)
    return rows


JOBS = [(t, m, n, b) for t in ("translate_stream", "ppl", "latency") for n in LENGTHS
        for m, b in (("full", "full"), ("sink4", "64"), ("sink4", "128"))]
JOBS += [("translate_batch", "full", n, "full") for n in LENGTHS]


def _write_raw(root, job) -> str:
    task, method, length, budget = job
    path = os.path.join(root, "raw", "tiny", task, "synth", method, f"L{length}_B{budget}.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(schema.to_table(_rows(*job)), path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("agg")
    raw = [_write_raw(root, job) for job in JOBS]
    heads = os.path.join(root, "heads", "tiny.parquet")
    os.makedirs(os.path.dirname(heads))
    types = ["retrieval", "induction", "local", "sink"]
    pd.DataFrame([dict(layer=l, q_head=q, kv_head=q // 2, retrieval=(l * q % 5) / 5, induction=q / 4,
                       local=l / 4, sink=0.1 * (l + q), type=types[(l + q) % 4])
                  for l in range(LAYERS) for q in range(4)]).to_parquet(heads)
    out = root / "results"
    written = agg.aggregate(raw, CONFIG, str(out), [heads])
    return {"root": root, "raw": raw, "out": out, "written": written}


def test_all_parquet_has_every_row(run):
    t = pq.read_table(run["out"] / "all.parquet")
    assert t.num_rows == len(JOBS) * N_SAMPLES
    assert t.schema.names == list(schema.COLUMNS)
    assert all(os.path.exists(p) for p in run["written"].values())
    assert not [f for f in os.listdir(run["out"] / "tables") if f.startswith(".tmp")]


def test_cells(run):
    cells = pd.read_csv(run["out"] / "tables" / "cells.csv", dtype={"budget": str})
    assert len(cells) == len(JOBS)
    ts = cells[cells["task"] == "translate_stream"].set_index(["method", "length", "budget"])
    assert ts.loc[("full", 1024, "full"), "bleu"] > ts.loc[("sink4", 1024, "64"), "bleu"]
    assert ts["bleu_signature"].str.startswith("nrefs:1").all()
    sink = ts.loc[("sink4", 1024, "64")]
    assert sink["bleu_delta"] < 0 and 0 <= sink["bleu_p_value"] <= 1 and sink["n_paired"] == N_SAMPLES
    assert 0 <= sink["bleu_p_ar"] <= 1 and sink["significance"] in ("significant", "not significant")
    assert sink["bleu_ci_low"] <= sink["bleu"] <= sink["bleu_ci_high"]
    full = ts.loc[("full", 1024, "full")]  # every score has its CI, the baseline's too
    assert full["bleu_ci_low"] <= full["bleu"] <= full["bleu_ci_high"] and full["chrf_ci_low"] < full["chrf_ci_high"]
    assert pd.isna(ts.loc[("full", 1024, "full"), "bleu_delta"])
    ppl = cells[(cells["task"] == "ppl") & (cells["method"] == "full") & (cells["length"] == 512)].iloc[0]
    rows = _rows("ppl", "full", 512, "full")
    expect = math.exp(sum(r["nll_sum"] for r in rows) / sum(r["n_scored_tokens"] for r in rows))
    assert ppl["perplexity"] == pytest.approx(expect)
    assert ppl["perplexity_ci_low"] <= ppl["perplexity"] <= ppl["perplexity_ci_high"]
    lat = cells[(cells["task"] == "latency") & (cells["method"] == "full") & (cells["length"] == 512)].iloc[0]
    assert lat["decode_ms_median"] == pytest.approx(pd.Series([5.0 + 0.1 * i for i in range(N_SAMPLES)]).median())
    assert lat["quality_meaningful"] and lat["n_samples"] == N_SAMPLES


def test_study_rows(run):
    long = pd.read_csv(run["out"] / "tables" / "long.csv", dtype={"budget": str})
    assert sorted(zip(long["method"], long["length"], long["budget"])) == [
        ("full", 512, "full"), ("full", 1024, "full"), ("sink4", 512, "64"), ("sink4", 1024, "64")]
    assert "perplexity" not in long and "decode_ms_median" not in long  # no all-null columns
    budgets = pd.read_csv(run["out"] / "tables" / "budgets.csv", dtype={"budget": str})
    assert sorted(zip(budgets["task"], budgets["budget"])) == [
        ("ppl", "128"), ("ppl", "64"), ("translate_stream", "128"), ("translate_stream", "64")]


def _tex_rows(path) -> list[list[str]]:
    body = path.read_text().split(r"\midrule", 1)[1].split(r"\bottomrule")[0]
    return [[c.strip() for c in line.rstrip(" \\").split("&")]
            for line in body.splitlines() if "&" in line]


def test_tex_bold_best_bleu(run):
    tex = (run["out"] / "tables" / "long.tex").read_text()
    assert all(k in tex for k in (r"\toprule", r"\midrule", r"\bottomrule"))
    assert "PPL" not in tex and "BLEU" in tex and "$p_{bs}$" in tex and "$p_{ar}$" in tex
    rows = _tex_rows(run["out"] / "tables" / "long.tex")
    header = [h.strip() for h in tex.split(r"\toprule")[1].split(r"\\")[0].split("&")]
    col = header.index("BLEU")
    long = pd.read_csv(run["out"] / "tables" / "long.csv", dtype={"budget": str})
    assert len(rows) == len(long)
    for length, block in long.groupby("length"):  # bold = best in each length block
        best = block.loc[block["bleu"].idxmax()]
        for r in rows:
            if r[0] != str(length):
                continue
            is_best = r[header.index("method")] == best["method"]
            assert (r[col] == rf"\textbf{{{best['bleu']:.2f}}}") == is_best, r


def test_figures_written(run):
    fig_dir = run["out"] / "figures"
    for name in ("bleu", "ppl", "memory", "latency", "pareto", "lagging", "heads"):
        assert os.path.getsize(fig_dir / f"{name}.pdf") > 5000, name
        assert os.path.getsize(fig_dir / f"{name}.png") > 20000, name
    bleu = pd.read_csv(fig_dir / "bleu.csv")
    assert set(bleu["method"]) == {"full", "sink4", "oracle batch"}
    assert set(bleu["length"]) == set(LENGTHS)
    for name in ("ppl", "memory", "latency", "pareto", "lagging"):
        d = pd.read_csv(fig_dir / f"{name}.csv")
        assert set(d["method"]) == {"full", "sink4"} and set(d["length"]) == set(LENGTHS), name
    assert len(pd.read_csv(fig_dir / "heads.csv")) == LAYERS * 4


def test_missing_data_figure_still_written(tmp_path):
    paths = figures.REGISTRY["latency"].draw(pd.DataFrame(columns=["task", "method", "decode_ms_median"]),
                                             str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["latency.csv", "latency.pdf", "latency.png"]
    assert os.path.getsize(tmp_path / "latency.png") > 5000
    assert pd.read_csv(tmp_path / "latency.csv").empty


def test_unknown_version_refused(run, tmp_path):
    rows = _rows("ppl", "full", 512, "full")
    for r in rows:
        r["schema_version"] = 99
    bad = str(tmp_path / "L512_Bfull.parquet")
    pq.write_table(schema.to_table(rows), bad)
    with pytest.raises(schema.SchemaError, match=re.escape(bad)):
        agg.aggregate(run["raw"][:2] + [bad], CONFIG, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "all.parquet").exists()


def test_truncated_file_refused(run, tmp_path):
    with open(run["raw"][0], "rb") as f:
        data = f.read()
    bad = tmp_path / "truncated.parquet"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(schema.SchemaError, match=re.escape(str(bad))):
        agg.aggregate([run["raw"][1], str(bad)], CONFIG, str(tmp_path / "out"))


def test_duplicate_samples_refused(run, tmp_path):
    with pytest.raises(ValueError, match="more than once"):
        agg.read_raw([run["raw"][0], run["raw"][0]])


def test_no_raw_files_is_an_error_and_touches_nothing(run, tmp_path):
    """An aggregation with no inputs must not replace existing tables with empty ones."""
    import hashlib

    import yaml

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"studies": {"long": CONFIG["studies"]["long"]}}))

    def digests():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run["out"].rglob("*") if p.is_file()}

    before = digests()
    with pytest.raises(ValueError, match="no raw result files"):
        agg.main(["--config", str(cfg), "--out", str(run["out"])])
    with pytest.raises(ValueError, match="no raw result files"):
        agg.main(["--figure", "bleu", "--out", str(run["out"])])
    assert digests() == before
    res = tmp_path / "res"  # the figures that read no raw results still work without them
    assert agg.main(["--figure", "training", "--models", str(tmp_path / "no-model"), "--out", str(res)]) == 0
    assert (res / "figures" / "training.pdf").exists() and pd.read_csv(res / "figures" / "training.csv").empty


def test_study_without_its_cells_says_so(run, tmp_path):
    spec = dict(CONFIG["studies"]["long"], lengths=[4096])
    agg.aggregate(run["raw"][:2], {"studies": {"gone": spec}, "aggregate": {"n_resamples": 0}}, str(tmp_path))
    assert "no data for this study" in (tmp_path / "tables" / "gone.tex").read_text()


def test_paired_tests_are_sacrebleus():
    """The p-values are sacreBLEU's own PairedTest (bootstrap and approximate randomization)."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    from kvbench import stats

    rng = random.Random(3)
    refs = [_sentence(rng, 12) for _ in range(10)]
    base = [_hypothesis(r, rng, 0.05) for r in refs]
    hyps = [_hypothesis(r, rng, 0.4) for r in refs]
    got = stats.paired_tests(base, hyps, refs, n_resamples=300, seed=7)
    os.environ["SACREBLEU_SEED"] = "7"
    try:
        for test, key, n in (("bs", "bleu_p_value", 300), ("ar", "bleu_p_ar", 1000)):
            _, scores = PairedTest([("b", base), ("s", hyps)], {"BLEU": BLEU()}, [refs], test_type=test,
                                   n_samples=n)()
            assert got[key] == pytest.approx(scores["BLEU"][1].p_value)
    finally:
        del os.environ["SACREBLEU_SEED"]
    assert got["significance"] == "significant" and got["bleu_delta"] < 0
    few = stats.paired_tests(base[:5], hyps[:5], refs[:5])  # 2^(1-5) > 0.05: no test can reject
    assert few["significance"] == "n < 6" and "bleu_p_value" not in few


def test_too_few_samples_are_marked_in_the_table():
    cells = pd.DataFrame([dict(task="translate_stream", model="m", dataset="d", length=512, budget="64", method="h2o",
                               bleu=50.0, bleu_delta=-3.0, bleu_p_value=float("nan"), significance="n < 6",
                               cache_bytes_peak=100.0, budget_bytes=90.0)])
    tex = agg.study_tex(cells, "s")
    assert "n$<$6" in tex and r"100.00$^\dagger$" in tex and r"\textbf{100" not in tex


def test_headline_names_the_best_method_per_budget_against_full(run, capsys):
    from kvbench import summary

    cells = pd.read_csv(run["out"] / "tables" / "cells.csv", dtype={"budget": str})
    ts = cells[(cells["task"] == "translate_stream") & (cells["length"] == 1024)].set_index(["method", "budget"])
    assert summary.main([str(run["out"])]) == 0
    out = capsys.readouterr().out
    assert "streaming translation at 1024 tokens" in out and f"full {ts.loc[('full', 'full'), 'bleu']:.1f}" in out
    for b in ("64", "128"):
        line = next(x for x in out.splitlines() if x.strip().startswith(f"B={b}:"))
        assert f"best sink4 {ts.loc[('sink4', b), 'bleu']:.1f}" in line and "vs full" in line
    assert "figures:" in out and "cells.csv" in out and "report.html" in out


def drawn(name, cells, tmp_path, look) -> dict:
    """Draw figure `name` from `cells` and return look(fig), taken just before the figure is saved."""
    seen = {}
    real_save = _draw.save

    def keep(fig, data, out_dir, fig_name):
        seen.update(look(fig))
        return real_save(fig, data, out_dir, fig_name)

    _draw.save = keep
    try:
        figures.REGISTRY[name].draw(cells, str(tmp_path))
    finally:
        _draw.save = real_save
    return seen


def test_figures_keep_one_colour_per_method_and_show_equal_series(tmp_path):
    """A method's colour does not depend on which methods a figure shows; identical series are
    named in the legend and dodged apart; BLEU is drawn on its whole scale."""
    import matplotlib.pyplot as plt

    _draw.set_methods(["full", "a", "b", "c"])
    try:
        one = pd.DataFrame({"method": ["full", "c"]})
        three = pd.DataFrame({"method": ["full", "a", "b", "c"]})
        assert _draw.palette(one)["c"] == _draw.palette(three)["c"]
        cells = pd.DataFrame([dict(task="translate_stream", model="m", dataset="d", method=m, budget=b, length=n,
                                   bleu=v, quality_meaningful=True)
                              for m, b, v in (("full", "full", 99.0), ("a", "64", 80.0), ("b", "64", 80.0),
                                              ("c", "64", 80.01))
                              for n in (512, 1024)])
        seen = drawn("bleu", cells, tmp_path, lambda fig: dict(
            labels=[t.get_text() for leg in fig.legends for t in leg.get_texts()], ylim=fig.axes[0].get_ylim(),
            x={tuple(line.get_xdata()) for line in fig.axes[0].get_lines()}))
        assert "b (same as a)" in seen["labels"] and "c" in seen["labels"]
        assert seen["ylim"][0] <= 0 and seen["ylim"][1] >= 100
        assert len(seen["x"]) == 4  # four series, four distinct x positions: none hidden under another
        plt.close("all")
    finally:
        _draw.set_methods([])


def test_derived_metrics_against_full(run):
    cells = pd.read_csv(run["out"] / "tables" / "cells.csv", dtype={"budget": str})
    key = ["task", "method", "length", "budget"]
    c = cells.set_index(key)
    lat, full = c.loc[("latency", "sink4", 1024, "64")], c.loc[("latency", "full", 1024, "full")]
    assert lat["speedup_vs_full"] == pytest.approx(full["decode_ms_median"] / lat["decode_ms_median"])
    assert lat["compression_vs_full"] == pytest.approx(full["cache_bytes_peak"] / lat["cache_bytes_peak"])
    ppl, pfull = c.loc[("ppl", "sink4", 1024, "64")], c.loc[("ppl", "full", 1024, "full")]
    assert ppl["ppl_increase_pct"] == pytest.approx(100 * (ppl["perplexity"] / pfull["perplexity"] - 1))
    assert pd.isna(pfull["ppl_increase_pct"])


def test_samples_with_an_empty_hypothesis_are_skipped_in_lagging_and_counted():
    """SimulEval skips a sample with no output: AL is NaN there, the cell mean leaves it out and counts it."""
    rows = pd.DataFrame(_rows("translate_stream", "sink4", 512, "64"))
    rows.loc[0, ["hypothesis", "al", "laal", "hyp_words"]] = ["", float("nan"), float("nan"), 0]
    cell = agg._cell(rows)
    assert cell["lagging_skipped"] == 1
    assert cell["al"] == pytest.approx(rows["al"].iloc[1:].mean())


@pytest.mark.parametrize("rows", [1, 3, 6])
def test_a_figures_title_never_overlaps_its_panels(rows):
    """The title sits above the panel titles however many rows a figure has (a tall figure's 2% top
    margin once put it over the first row)."""
    import matplotlib

    matplotlib.use("Agg")
    from kvbench.figures._draw import legend, panel_grid

    d = pd.DataFrame({"model": [f"m{i}" for i in range(rows) for _ in range(4)], "dataset": "d",
                      "panel": [f"budget {b} tokens" for _ in range(rows) for b in (64, 128, 256, 512)]})
    fig, grid = panel_grid(d, ["model", "dataset"], [f"budget {b} tokens" for b in (64, 128, 256, 512)], "A title")
    legend(fig, [])
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(r)
    assert title.y1 <= fig.bbox.y1
    assert all(title.y0 > ax.title.get_window_extent(r).y1 for ax, _ in grid)


@pytest.mark.parametrize("lengths", [(2000, 4096, 5000, 10000, 20000), (410, 500, 1000, 2000, 4000, 8000)])
def test_length_axis_labels_never_overlap(tmp_path, lengths):
    """The paper's grids mix close lengths (4096 and 5000): every length gets a tick, labels that would
    print over each other are dropped (the longest is always labelled), and the points stay at their
    lengths (log2 scale once lengths span 4x)."""
    import matplotlib.pyplot as plt

    cells = pd.DataFrame([dict(task="translate_stream", model="m", dataset="d", method="full", budget="full", length=n,
                               bleu=90.0, quality_meaningful=True) for n in lengths])
    def look(fig):
        fig.canvas.draw()
        ax = fig.axes[0]
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        return dict(ticks=list(ax.get_xticks()), boxes=[t.get_window_extent() for t in labels],
                    texts=[t.get_text() for t in labels], scale=ax.get_xscale())

    seen = drawn("bleu", cells, tmp_path, look)
    plt.close("all")
    assert [int(t) for t in seen["ticks"]] == list(lengths) and seen["scale"] == "log"
    assert str(lengths[-1]) in seen["texts"] and str(lengths[0]) in seen["texts"]
    boxes = sorted(seen["boxes"], key=lambda b: b.x0)
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), seen["texts"]


def test_pareto_labels_each_budget_once_at_its_best_point(tmp_path):
    """The methods of one budget hold the same bytes and sit on one vertical: the budget is labelled
    once, at its best BLEU, not once per method on top of each other."""
    rows = [("full", "full", 4e6, 95.0), ("a", "64", 2.5e5, 81.0), ("b", "64", 2.5e5, 52.0), ("c", "64", 2.5e5, 60.0),
            ("a", "128", 5e5, 85.0), ("b", "128", 5e5, 93.0)]
    cells = pd.DataFrame([dict(task="translate_stream", model="m", dataset="d", method=m, budget=b, length=1024,
                               cache_bytes_peak=x, bleu=v, quality_meaningful=True) for m, b, x, v in rows])
    seen = drawn("pareto", cells, tmp_path, lambda fig: dict(
        notes=sorted((t.get_text(), t.xy[1]) for t in fig.axes[0].texts)))
    assert seen["notes"] == [("128", 93.0), ("64", 81.0), ("full", 95.0)]
