"""The budget holds for every scored token (DESIGN.md "Budget semantics"), on a tiny random model.

- Perplexity of every evicting method, fed in prefill chunks (the ppl task's way), equals the same
  document fed one token per forward: a chunk in which a head would pass its budget runs stepwise
  (each token appended, attended and evicted in turn in every layer), or as one-token forwards.
- No query ever sees more than B cached entries per (layer, KV head) plus itself: checked on every
  attention call (`StoreCache.trace`), for ppl and for streaming translation (instruction + k words
  prefill, READ words, WRITE tokens); a forward of several tokens only happens while nothing is evicted.
- `retained_tokens_peak` <= B + 1 (the token being written) for dense methods.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvbench import tasks
from kvbench.engine.session import Session
from kvbench.methods import REGISTRY, method_from_config
from kvbench.prompt import Prompter

EVICTING = sorted(n for n, c in REGISTRY.items() if c.evicts)
TYPES = ["retrieval", "local", "induction", "local", "local", "retrieval", "local", "induction"]
PROFILE = SimpleNamespace(types=[TYPES[2 * i: 2 * i + 2] for i in range(4)])  # (L=4, H=2): the tiny model
BUDGET = 24


def session(model, name, chunk, budget=BUDGET):
    m = method_from_config(name, {})
    return Session(model, m, budget, chunk_size=chunk, profile=PROFILE if m.needs_profile else None)


def check_visible(sess: Session, dense: bool) -> int:
    """Every traced attention call: a multi-token forward only while every head has room for all of
    it; a one-token forward sees at most budget + 1 entries per head (dense storage). Returns the
    number of calls at a full cache."""
    budgets = sess._budgets_host
    full = 0
    for call in sess.cache.trace:
        n = call["qseq"].shape[0]
        live = call["kvalid"].sum(dim=1).tolist()  # (H,) entries visible to the new tokens
        heads = call.get("heads", range(len(live)))  # a part of heads grouped by budget: which heads
        for h, x in zip(heads, live):
            b = budgets[call["layer"]][h]
            if n > 1:
                assert x <= b, f"layer {call['layer']} head {h}: a chunk of {n} tokens saw {x} > budget {b}"
            elif dense:
                assert x <= b + 1, f"layer {call['layer']} head {h}: one token saw {x} > budget {b} + itself"
            full += x >= b
    return full


@pytest.mark.parametrize("name", EVICTING)
def test_ppl_equals_token_by_token(tiny, docs, name):
    model, tok, d = tiny
    p = Prompter(tok, d, "syn_src", "syn_tgt")
    doc = docs[192][0]
    chunked, single = session(model, name, 64), session(model, name, 1)
    chunked.cache.trace = []
    a = tasks.perplexity(chunked, p, doc, 3)
    b = tasks.perplexity(single, p, doc, 3)
    assert a["n_scored_tokens"] == b["n_scored_tokens"] > 50
    assert abs(a["nll_sum"] - b["nll_sum"]) <= 1e-5 * abs(b["nll_sum"]), (a["nll_sum"], b["nll_sum"])
    dense = chunked.method.storage == "dense"
    assert check_visible(chunked, dense) > 100  # the budget was binding for most of the document
    if dense:
        assert chunked.memory.row()["retained_tokens_peak"] <= BUDGET + 1


def test_one_token_forwards_fallback(tiny, docs):
    """With stepwise chunks off, an evicting chunk becomes one-token forwards: the same NLL."""
    model, tok, d = tiny
    p = Prompter(tok, d, "syn_src", "syn_tgt")
    a, b = session(model, "h2o", 64), session(model, "h2o", 1)
    a.stepwise = False
    a.cache.trace = []
    ra, rb = tasks.perplexity(a, p, docs[192][1], 3), tasks.perplexity(b, p, docs[192][1], 3)
    assert abs(ra["nll_sum"] - rb["nll_sum"]) <= 1e-5 * abs(rb["nll_sum"])
    assert check_visible(a, True) > 100 and a.memory.row()["retained_tokens_peak"] == BUDGET + 1


@pytest.mark.parametrize("name", ["h2o", "streaming_llm"])
def test_translation_prefill_and_reads_within_budget(tiny, docs, name):
    """Streaming translation with a budget smaller than instruction + k words: the prefill goes one
    token per forward once the cache is full, so no query sees more than B + itself; the result is
    the same with any chunk size."""
    model, tok, d = tiny
    p = Prompter(tok, d, "syn_src", "syn_tgt")
    budget = 5  # < the instruction (6 tokens): even the first feed must split
    rows = []
    for chunk in (64, 1):
        sess = session(model, name, chunk, budget)
        sess.cache.trace = []
        rows.append(tasks.translate(sess, p, docs[96][0], k=5))
        assert check_visible(sess, True) > 20
        assert sess.memory.bytes_peak <= sess.budget_bytes(budget) * (budget + 1) // budget
        assert sess.memory.row()["retained_tokens_peak"] <= budget + 1
    assert rows[0]["hypothesis"] == rows[1]["hypothesis"] and rows[0]["delays"] == rows[1]["delays"]
