"""The RULER tasks (`ruler_<subtask>`) through a real Session on a random-weight HF twin: every subtask
produces rows at the job's length, scored with RULER's string_match_all against the sample's answers
(case-insensitive); the context is fed before the question; the builtin model is refused."""

from __future__ import annotations

import json

import pytest

from kvbench import schema, tasks
from kvbench.data import haystack_docs
from kvbench.engine.session import Session
from kvbench.longctx import ruler as lruler
from kvbench.longctx.scoring import string_match_all
from kvbench.methods import REGISTRY
from kvbench.models import build_model, load_model
from kvbench.prompt import Prompter
from kvbench.tasks import ruler

SUBTASKS = ("niah_multikey", "niah_multivalue", "vt", "cwe")
L = 2048  # tokens of the byte-level twin: cwe needs them; vt's 500-token one-shot example never fits (vt_zeroshot)


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ruler_twin") / "m")
    build_model("random:tiny-llama", d, seed=0)
    model, tok, _ = load_model(d)
    return model, tok, Prompter(tok, d, None, None), haystack_docs(L, 2, 0, tok)


def test_one_task_per_subtask_on_haystack_datasets():
    names = [f"ruler_{s}" for s in SUBTASKS]
    assert all(n in tasks.TASKS for n in names) and set(lruler.TASKS) == set(SUBTASKS)
    for n in names:
        cls = tasks.get(n)
        assert cls.kinds == ("haystack",) and cls.subtask == n[len("ruler_"):] and not tasks.base.fields(n)
    assert tasks.base.defaults_for_kind("haystack") == ["niah", *names]


@pytest.mark.model
@pytest.mark.parametrize("subtask", SUBTASKS)
@pytest.mark.parametrize("method,budget", [("full", None), ("streaming_llm", 64)])
def test_rows_at_the_length_scored_as_ruler(twin, subtask, method, budget, monkeypatch):
    model, tok, p, docs = twin
    t = tasks.from_params(f"ruler_{subtask}", {})
    pol = REGISTRY[method](**({"n_sink": 4} if method == "streaming_llm" else {}))
    rows = []
    for d in docs if budget is None else docs[:1]:  # evicting runs are stepwise: one document
        s, r = ruler.ruler_sample(p, d, subtask)
        fed, need = t.positions(p, d)
        assert fed <= L + 8 and need <= L + 8 and r.target <= L
        # the context is fed before the question, the answer prefix last
        parts = [tok.decode(ids) for ids, _, _ in s.feeds]
        assert parts[0].rstrip().endswith(r.context.strip()[-40:]) and parts[1].strip() == r.question.strip()
        assert parts[2].endswith(r.answer_prefix) and len(s.feeds) == 3
        session = Session(model, pol, budget, 64)
        row = t.run(session, p, d)
        assert set(row) == set(t.columns) and row["subtask"] == (subtask if subtask != "vt" else "vt_zeroshot")
        assert json.loads(row["expected"]) == list(r.answers)
        assert row["score"] == string_match_all(row["prediction"], r.answers)
        assert session.tokens <= fed  # RULER's tokens_to_generate at most (EOS stops earlier)
        if budget is not None:
            assert session.memory.row()["retained_tokens_peak"] <= budget + 1
        rows.append(dict(row))
    schema.to_table(rows)
    # RULER's match is case-insensitive: the answers in upper case score 1
    monkeypatch.setattr(p, "decode", lambda ids: " ".join(json.loads(rows[0]["expected"])).upper())
    row = t.run(Session(model, pol, budget, 64), p, docs[0])
    assert row["score"] == 1.0


@pytest.mark.model
def test_the_builtin_model_is_refused(tiny):
    model, tok, d = tiny
    p = Prompter(tok, d, "syn_src", "syn_tgt")
    doc = haystack_docs(256, 1, 0, tok)[0]
    with pytest.raises(ValueError, match="hub"):
        tasks.from_params("ruler_vt", {}).positions(p, doc)
