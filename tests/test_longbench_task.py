"""The long-context benchmark tasks (`longbench`, `infinitebench`, `loogle`): documents made from local files
in each benchmark's real layout (through `datasets.load_dataset`), fed through a real Session on a
random-weight HF twin: context first, then question; a context longer than the room is cut in the
middle; every row scored with the subset's official metric; cells report the mean score with its
metric named; configs naming an unsupported subset are refused before any work."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from kvbench import schema, tasks
from kvbench.config import ConfigError, dataset_kind, dataset_tasks
from kvbench.data import make_data, read_docs
from kvbench.engine.session import Session
from kvbench.longctx import loaders, scoring
from kvbench.methods import REGISTRY
from kvbench.models import build_model, load_model
from kvbench.prompt import Prompter
from kvbench.tasks import longbench as lb

HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL = os.path.join(HERE, "data", "longctx")
PAPER_LB = os.path.join(HERE, "data", "paper", "longbench")
CASES = [("longbench", "hotpotqa"), ("longbench", "trec"), ("longbench", "passage_retrieval_en"),
         ("infinitebench", "longbook_choice_eng"), ("infinitebench", "passkey"), ("loogle", "shortdep_qa"),
         ("loogle", "shortdep_cloze"), ("loogle", "longdep_summarization")]


def _cfg(bench: str, subset: str) -> dict:
    return {"source": bench, "subset": subset, "data_files": os.path.join(LOCAL, bench, f"{subset}.jsonl")}


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("lb_twin") / "m")
    build_model("random:tiny-llama", d, seed=0)
    model, tok, _ = load_model(d)
    return model, tok, Prompter(tok, d, None, None)


def _docs(tok, tmp_path, bench, subset, length=1024, n=1, **cfg):
    out = str(tmp_path / f"{bench}_{subset}_{length}.jsonl")
    make_data({**_cfg(bench, subset), **cfg}, length, n, 0, out, tokenizer=tok, name=subset)
    return read_docs(out)


def test_one_task_per_benchmark_on_its_own_datasets():
    for b in ("longbench", "infinitebench", "loogle"):
        cls = tasks.get(b)
        assert cls.kinds == (b,) and not cls.builtin and cls.reads_context
        assert dataset_kind({"source": b, "subset": "x"}) == b
        assert dataset_tasks({"datasets": {"d": {"source": b}}}, "d") == [b]
        assert set(tasks.base.fields(b)) == {"max_new_tokens", "query_first"}


@pytest.mark.model
@pytest.mark.parametrize("bench,subset", CASES)
def test_documents_rows_and_official_scores(twin, tmp_path, bench, subset, monkeypatch):
    model, tok, p = twin
    docs = _docs(tok, tmp_path, bench, subset)
    want = loaders.LOADERS[bench](subset, data_files=_cfg(bench, subset)["data_files"], limit=1)[0]
    d = docs[0]
    assert d["source"] == want.context and d["sample"]["answers"] == list(want.answers)
    assert d["n_tokens"] == min(1024, len(tok(want.context, add_special_tokens=False)["input_ids"]))
    t = tasks.from_params(bench, {"max_new_tokens": 3})
    fed, need = t.positions(p, d)
    assert fed <= 1024 and need <= 1024
    session = Session(model, REGISTRY["streaming_llm"](n_sink=4), 64, 64)
    row = t.run(session, p, d)
    assert set(row) == set(t.columns) and row["subtask"] == subset and row["metric"] == want.metric
    assert json.loads(row["expected"]) == list(want.answers)
    assert row["score"] == want.score(row["prediction"])
    assert session.memory.row()["retained_tokens_peak"] <= 64 + 1
    schema.to_table([dict(row)])
    # the reference itself scores 1 under the subset's metric (the row's scorer is the official one)
    monkeypatch.setattr(p, "decode", lambda ids: want.answers[0] if want.metric != "choice" else want.answers[1])
    assert t.run(Session(model, REGISTRY["full"](), None, 64), p, d)["score"] == 1.0


@pytest.mark.model
def test_context_before_question_and_query_first_labelled(twin, tmp_path):
    model, tok, p = twin
    d = _docs(tok, tmp_path, "longbench", "hotpotqa")[0]
    ls = lb.long_sample(d)
    s, _ = lb.bench_sample(p, d, 4, False)
    first, second = (tok.decode(ids) for ids, _, _ in s.feeds)
    assert first.rstrip().endswith(ls.context.strip()[-40:]) and ls.question in second and ls.question not in first
    q, _ = lb.bench_sample(p, d, 4, True)
    parts = [tok.decode(ids) for ids, _, _ in q.feeds]
    assert len(parts) == 3 and ls.question in parts[0] and ls.context.strip()[-40:] in parts[1]
    row = tasks.from_params("longbench", {"max_new_tokens": 2, "query_first": True}).run(
        Session(model, REGISTRY["full"](), None, 64), p, d)
    assert row["query_first"] is True


@pytest.mark.model
@pytest.mark.parametrize("length", [260, 301])
def test_a_long_context_is_cut_in_the_middle_to_the_length(twin, tmp_path, length):
    model, tok, p = twin
    d = _docs(tok, tmp_path, "longbench", "hotpotqa", length=length)[0]
    ctx = tok(d["source"], add_special_tokens=False)["input_ids"]
    t = tasks.from_params("longbench", {"max_new_tokens": 8})
    s, _ = lb.bench_sample(p, d, 8, False)
    fed, need = t.positions(p, d)
    assert fed == length and need == length  # prompt + generation fill the length exactly
    kept = s.info["context_tokens"]
    assert s.info["context_tokens_total"] == len(ctx) > kept
    head = s.feeds[0][0]
    half = kept // 2
    assert head[-kept:] == ctx[:half] + ctx[len(ctx) - (kept - half):]  # first and last halves, nothing else
    row = t.run(Session(model, REGISTRY["full"](), None, 64), p, d)
    assert (row["context_tokens"], row["context_tokens_total"]) == (kept, len(ctx))


def test_middle_cut():
    ids = list(range(10))
    assert lb.middle_cut(ids, 10) == ids and lb.middle_cut(ids, 20) == ids
    assert lb.middle_cut(ids, 4) == [0, 1, 8, 9] and lb.middle_cut(ids, 5) == [0, 1, 7, 8, 9]
    assert lb.middle_cut(ids, 1) == [9]


@pytest.mark.model
def test_generation_length_is_the_benchmarks_own(twin, tmp_path):
    _, tok, p = twin
    for bench, subset, n in (("longbench", "hotpotqa", 32), ("longbench", "trec", 64),
                             ("infinitebench", "passkey", 6), ("loogle", "longdep_summarization", 512)):
        d = _docs(tok, tmp_path, bench, subset, length=2048)[0]
        assert lb.bench_sample(p, d, 0, False)[0].n_new == n
        assert lb.bench_sample(p, d, 5, False)[0].n_new == 5


@pytest.mark.model
def test_fewshot_and_code_subsets_skip_the_chat_template(twin, tmp_path):
    _, tok, p = twin
    trec = _docs(tok, tmp_path, "longbench", "trec")[0]
    hot = _docs(tok, tmp_path, "longbench", "hotpotqa")[0]
    head, _ = lb.frame(p)
    assert len(head) > 1  # the twin has a chat template
    assert lb.bench_sample(p, hot, 4, False)[0].feeds[0][0][:len(head)] == head
    assert lb.bench_sample(p, trec, 4, False)[0].feeds[0][0][:len(head)] != head


@pytest.mark.model
def test_too_short_a_length_and_the_builtin_model_are_refused(twin, tmp_path, tiny):
    _, tok, p = twin
    d = _docs(tok, tmp_path, "longbench", "hotpotqa", length=40)[0]
    with pytest.raises(ValueError, match="leaves no room"):
        tasks.from_params("longbench", {}).positions(p, d)
    bp = Prompter(tiny[1], tiny[2], "syn_src", "syn_tgt")
    with pytest.raises(ValueError, match="hub"):
        tasks.from_params("longbench", {}).positions(bp, d)


def test_make_data_counts_and_refuses(tmp_path):
    from transformers import AutoTokenizer  # noqa: F401 - the twin's tokenizer is not needed: a byte counter

    class Bytes:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode())}

    with pytest.raises(ValueError, match="made 2 of 5"):
        make_data(_cfg("longbench", "hotpotqa"), 512, 5, 0, str(tmp_path / "x.jsonl"), tokenizer=Bytes(), name="hp")
    assert not (tmp_path / "x.jsonl").exists()
    n = make_data({**_cfg("longbench", "hotpotqa"), "allow_fewer": True}, 64, 5, 0, str(tmp_path / "y.jsonl"),
                  tokenizer=Bytes(), name="hp")
    docs = read_docs(str(tmp_path / "y.jsonl"))
    assert n == 2 and [d["n_tokens"] for d in docs] == [64, 64] and [d["id"] for d in docs] == [0, 1]
    with pytest.raises(ValueError, match="subset"):
        make_data({"source": "longbench"}, 64, 1, 0, str(tmp_path / "z.jsonl"), tokenizer=Bytes())


def test_the_paper_fixture_reads_as_the_hub_layout():
    for sub in ("qasper", "hotpotqa", "gov_report", "trec", "passage_retrieval_en", "lcc"):
        got = loaders.load_longbench(sub, path=PAPER_LB)
        assert len(got) == 2 and got[0].metric == loaders.LONGBENCH_METRICS[sub]


@pytest.mark.parametrize("subset,msg", [("dureader", "jieba"), ("nope", "not supported")])
def test_config_refuses_an_unsupported_subset(tmp_path, subset, msg):
    from kvbench.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
models: {{m: {{source: "random:tiny-llama"}}}}
datasets: {{lb: {{source: longbench, subset: {subset}}}}}
methods: {{full: {{type: full}}}}
studies: {{s: {{tasks: [longbench], methods: [full], lengths: [512], models: [m], datasets: [lb]}}}}
""")
    with pytest.raises(ConfigError, match=r"datasets/lb/subset") as e:
        load_config(str(cfg))
    assert subset in str(e.value) and ("not supported" in str(e.value) or msg in str(e.value))


def test_cells_report_the_mean_score_and_name_the_metric():
    rows = pd.DataFrame({"sample_id": [0, 1, 2, 3], "score": [1.0, 0.5, 0.0, 0.5], "metric": ["qa_f1"] * 4})
    t = tasks.get("longbench")()
    assert t.cell(rows) == {"score": 0.5, "metric": "qa_f1"}
    ci = t.cell_ci(rows, 200, 0)
    assert 0 <= ci["score_ci_low"] <= 0.5 <= ci["score_ci_high"] <= 1
    assert "accuracy" not in t.cell(rows)
    assert scoring.METRICS["qa_f1"]("Marta Velez", ["Marta Velez"]) == 1.0


# predictions that separate the metrics: each scores 1 only under its subset's official scorer
# (SQuAD normalisation, LongBench's first-line cut for trec, InfiniteBench's first integer and letter)
CRAFTED = [("longbench", "hotpotqa", "The Marta Velez!", 1.0),
           ("longbench", "trec", "Human being\nLocation", 1.0),  # 0.5 without the first-line cut
           ("infinitebench", "passkey", "The pass key is 68341.", 1.0),  # qa_f1 would give 0.4
           ("infinitebench", "longbook_choice_eng", "B", 1.0)]


@pytest.mark.model
@pytest.mark.parametrize("bench,subset,prediction,want", CRAFTED)
def test_each_subset_is_scored_by_its_own_metric(twin, tmp_path, bench, subset, prediction, want, monkeypatch):
    model, tok, p = twin
    d = _docs(tok, tmp_path, bench, subset)[0]
    monkeypatch.setattr(p, "decode", lambda ids: prediction)
    row = tasks.from_params(bench, {"max_new_tokens": 1}).run(Session(model, REGISTRY["full"](), None, 64), p, d)
    assert row["score"] == want
