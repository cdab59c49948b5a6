"""The `niah` task through a real Session: on the builtin architecture (random weights, its word-level
tokenizer and language) and on a random-weight HF twin (chat template, multi-token words). Rows, the
needle's depth and token index, case-insensitive exact-match scoring, query_first, full == a budget
above the length, and a window that can no longer see the needle (kept positions, not accuracy)."""

from __future__ import annotations

import pytest

from kvbench import schema, tasks
from kvbench.data import haystack_docs
from kvbench.engine.session import Session
from kvbench.methods import REGISTRY
from kvbench.models import build_model, load_model
from kvbench.prompt import Prompter
from kvbench.streams import ROLE_SOURCE
from kvbench.tasks import niah
from kvbench.tasks.long_common import decode_greedy


@pytest.fixture(scope="module")
def builtin(tiny):
    model, tok, d = tiny
    return model, tok, Prompter(tok, d, "syn_src", "syn_tgt"), {L: haystack_docs(L, 5, 0, tok) for L in (160, 256)}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("niah_twin") / "m")
    build_model("random:tiny-llama", d, seed=0)
    model, tok, _ = load_model(d)
    return model, tok, Prompter(tok, d, None, None), {L: haystack_docs(L, 5, 0, tok) for L in (512, 1024)}


def task(**kw) -> niah.Niah:
    return tasks.from_params("niah", {"n_depths": 5, **kw})


def run(model, prompter, doc, method="full", budget=None, **kw):
    s = Session(model, REGISTRY[method](**({} if method == "full" else {"n_sink": 0, "positions": "original"}
                                           if method == "streaming_llm" else {})), budget, 16)
    return task(**kw).run(s, prompter, doc), s


def kept(session) -> set[int]:
    """Stream indices still cached in any layer and KV head."""
    return {int(x) for st in session.stores for x in st.seq[st.valid].tolist()}


def test_depths_are_evenly_spaced_and_cycle_over_documents():
    assert niah.depths(5) == [0.0, 0.25, 0.5, 0.75, 1.0] and niah.depths(2) == [0.0, 1.0]
    assert [niah.doc_depth({"id": i}, 3) for i in range(7)] == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0, 0.0]
    with pytest.raises(ValueError, match="n_depths"):
        niah.depths(1)


def test_score_is_case_insensitive_exact_match():
    assert niah.score("BAMOX gomegix", "Bamox Gomegix") == 1.0
    assert niah.score("the number is 1234567.", "1234567") == 1.0
    assert niah.score("12345678", "1234567") == 0.0  # a whole token, not a substring
    assert niah.score("Bamox Gomegixa", "Bamox Gomegix") == 0.0


@pytest.mark.model
@pytest.mark.parametrize("which", ["builtin", "hub"])
def test_rows_have_the_columns_and_score_their_prediction(which, request, monkeypatch):
    model, tok, p, docs = request.getfixturevalue(which)
    L = min(docs)
    rows = []
    for d in docs[L]:
        row, _ = run(model, p, d)
        assert set(row) == set(niah.COLUMNS) and set(row) <= set(schema.COLUMNS)
        assert row["depth"] == niah.doc_depth(d, 5) and row["query_first"] is False
        assert row["score"] == niah.score(row["prediction"], row["expected"]) in (0.0, 1.0)
        rows.append(row)
    schema.to_table(rows)  # the row types fit the schema
    # the row's score is the case-insensitive match: a prediction in other case still counts
    monkeypatch.setattr(p, "decode", lambda ids: "ANSWER: " + rows[0]["expected"].swapcase() + ".")
    row, _ = run(model, p, docs[L][0])
    assert row["score"] == 1.0 and row["prediction"] != row["expected"]
    if which == "builtin":  # names have case (hub values are digits)
        assert rows[0]["expected"] not in row["prediction"]


@pytest.mark.model
def test_builtin_needle_sits_at_its_depth(builtin):
    model, tok, p, docs = builtin
    vocab = tok.get_vocab()
    for d in docs[256]:
        s = task().sample(p, d)
        stream, roles = s.stream, [r for _, _, rr in s.feeds for r in rr]
        at = s.info["needle_position"]
        assert at == s.needle[0]
        words = tok.convert_ids_to_tokens([stream[i] for i in s.needle[:7]])
        # the binding "ka ROLE esi namo FIRST LAST ." in the source, its first word at needle_position
        assert words[0] == "ka" and words[2:4] == ["esi", "namo"] and words[6] == "."
        assert f"{words[4]}x {words[5]}x" == s.info["expected"] and roles[at] == ROLE_SOURCE
        assert [stream[i] for i in s.needle[:7]] == [vocab[w] for w in words]
        # ... and its translation on the target side (the teacher-forced stream holds a second copy)
        target = tok.convert_ids_to_tokens([stream[i] for i in s.needle[7:]])
        assert len(s.needle) == 14 and target[0] == "kax" and target[4:6] == s.info["expected"].split()
        assert all(roles[i] != ROLE_SOURCE for i in s.needle[7:]) and s.needle[7] > at
        # the context's source words before the needle, as a share of the filler's, is the depth
        first_feed = s.feeds[0][2]  # everything before the question's first token
        filler = sum(r == ROLE_SOURCE for r in first_feed) - 7
        before = sum(r == ROLE_SOURCE for r in roles[:at])
        ends = d["sent_ends"]
        sentence = max(b - a for a, b in zip([0] + ends[:-1], ends))
        assert abs(before / filler - niah.doc_depth(d, 5)) <= sentence / filler + 1e-9, (before, filler)
        assert before / filler == pytest.approx(s.info["depth_actual"])
        # and it is the sentence boundary closest to the depth (not the one before or after it)
        lens = [b - a for a, b in zip([0] + ends[:-1], ends)]
        n = next(k for k in range(len(lens) + 1) if sum(lens[:k]) == filler)
        cum = [sum(lens[:k]) for k in range(n + 1)]
        best = min(cum, key=lambda c: (abs(c / filler - niah.doc_depth(d, 5)), c))
        assert before == best, (before, best)


@pytest.mark.model
def test_hub_needle_sits_at_its_depth(hub):
    model, tok, p, docs = hub
    for d in docs[1024]:
        s = task().sample(p, d)
        stream, at = s.stream, s.info["needle_position"]
        needle = tok.decode([stream[i] for i in s.needle])
        assert needle.strip().startswith("The special magic number for") and s.info["expected"] in needle
        text = (" " if niah.doc_depth(d, 5) > 0 else "") + "The special magic"  # after a filler sentence: a space
        starts = [tok.decode(stream[i:i + 40]).startswith(text) for i in (at - 1, at, at + 1)]
        assert starts == [False, True, False]  # the needle's first token, not one before or after
        head = len(niah.frame(p)[0])
        context = len(s.feeds[0][0]) - head  # the first feed: the template's head, then the context
        before, after = at - head, context - (at - head) - len(s.needle)
        share = before / (before + after)
        assert abs(share - niah.doc_depth(d, 5)) < 0.1, share
        assert s.n_tokens + s.n_new - 1 <= d["length"]


@pytest.mark.model
@pytest.mark.parametrize("which", ["builtin", "hub"])
def test_query_first_puts_the_question_first_and_is_labelled(which, request):
    model, tok, p, docs = request.getfixturevalue(which)
    d = docs[max(docs)][2]
    last, first = task().sample(p, d), task(query_first=True).sample(p, d)
    if which == "hub":
        q = niah.encode(p, "What is the special magic number")
        s = first.stream
        q_at = next(i for i in range(len(s)) if s[i:i + len(q)] == q)
        assert q_at < first.info["needle_position"]
        sl = last.stream
        assert next(i for i in range(len(sl)) if sl[i:i + len(q)] == q) > last.info["needle_position"]
    else:  # the question's source sentence is read right after the instruction
        instr = len(p.instruction())
        qlen = sum(r == 0 for r in first.feeds[0][2]) - instr  # tokens read in the instruction role
        assert qlen in (7, 8)  # "ka [ADJ] NOUN VERB PREP ka ROLE ."
        words = tok.convert_ids_to_tokens(first.feeds[0][0][instr:instr + qlen])
        role = tok.convert_ids_to_tokens([last.stream[last.needle[1]]])[0]
        assert words[0] == "ka" and words[-3:] == ["ka", role, "."]
        assert first.feeds[0][2][instr:instr + qlen] == [0] * qlen  # read as instruction, not translated
    row, _ = run(model, p, d, query_first=True)
    assert row["query_first"] is True


@pytest.mark.model
@pytest.mark.parametrize("which", ["builtin", "hub"])
def test_a_budget_above_the_length_answers_as_the_full_cache(which, request):
    model, tok, p, docs = request.getfixturevalue(which)
    for d in docs[min(docs)][:3]:
        full, _ = run(model, p, d)
        for method in ("streaming_llm", "h2o"):
            pol = REGISTRY[method](**({"n_sink": 0, "positions": "original"} if method == "streaming_llm" else {}))
            s = Session(model, pol, d["length"] + 8, 16)
            row = task().run(s, p, d)
            assert row == full, (method, row, full)


@pytest.mark.model
@pytest.mark.parametrize("which", ["builtin", "hub"])
def test_a_window_shorter_than_the_distance_no_longer_holds_the_needle(which, request):
    model, tok, p, docs = request.getfixturevalue(which)
    L = max(docs)
    d = docs[L][1]  # depth 0.25: far from the question
    s = task().sample(p, d)
    distance = s.n_tokens - s.info["needle_position"]
    budget = 32
    assert budget < distance - len(s.needle)
    _, full = run(model, p, d)
    assert set(s.needle) <= kept(full)  # the full cache holds every needle token
    window = Session(model, REGISTRY["streaming_llm"](n_sink=0, positions="original"), budget, 16)
    decode_greedy(window, p, s)
    assert not kept(window) & set(s.needle)
    assert min(kept(window)) > max(s.needle)


def test_accuracy_cells_mean_and_bootstrap():
    import pandas as pd

    g = pd.DataFrame({"sample_id": range(6), "score": [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]})
    t = niah.Niah()
    assert t.cell(g) == {"accuracy": pytest.approx(4 / 6)}
    ci = t.cell_ci(g, 200, 0)
    assert 0 <= ci["accuracy_ci_low"] <= 4 / 6 <= ci["accuracy_ci_high"] <= 1


@pytest.mark.model
def test_eval_job_writes_niah_rows(tiny, tmp_path):
    """make-data (source: haystack) and `kvbench eval` end to end: rows of the current schema (the niah
    columns came with version 4)."""
    import pandas as pd

    from kvbench.data import make_data
    from kvbench.evaluate import run_eval

    model, tok, d = tiny
    data = str(tmp_path / "L160.jsonl")
    make_data({"source": "haystack", "n_samples": 3}, 160, 3, 0, data, tokenizer=tok)
    out = run_eval(model_dir=d, task="niah", data=data, method="window", method_type="streaming_llm",
                   params={"n_sink": 0, "positions": "original"}, budget=32, length=160,
                   out=str(tmp_path / "r.parquet"),
                   task_params={"n_depths": 3, "wait_k": 5, "target_offset": 0})
    df = pd.read_parquet(out)
    assert len(df) == 3 and (df["schema_version"] == schema.SCHEMA_VERSION).all() and schema.SCHEMA_VERSION >= 4
    assert list(df["depth"]) == [0.0, 0.5, 1.0] and df["needle_position"].is_monotonic_increasing
    assert df["retained_tokens_peak"].max() <= 33
