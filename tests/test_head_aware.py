"""Head profiling (classifier on constructed maps, real profile on the tiny model) and head-aware budgets."""

from __future__ import annotations

import torch

from kvbench import profiling, tasks
from kvbench.engine.session import Session
from kvbench.methods import method_from_config
from kvbench.methods.head_aware import split_budget
from kvbench.prompt import Prompter


def constructed_maps(t=40, n=18):
    """Four query heads over a repeated sequence: retrieval (argmax on the copied token),
    induction (diffuse but half its mass there), local (last 3 keys), sink (first token)."""
    q = torch.arange(1 + n, 1 + 2 * n - 1)
    src = q - n + 1
    p = torch.zeros(4, t, t)
    for i in range(t):
        p[2, i, max(0, i - 2) : i + 1] = 1.0
        p[3, i, 0] = 1.0
        p[0, i, : i + 1] = 1.0
        p[1, i, : i + 1] = 1.0
    for qi, si in zip(q, src):
        p[0, qi] = 0.01
        p[0, qi, si] = 1.0
        p[1, qi, : qi + 1] = 1.0
        p[1, qi, si] = float(qi)  # half the mass on the target, argmax too; but the copy is wrong
    p = torch.tril(p)
    p = p / p.sum(-1, keepdim=True)
    return [p], q, src


def test_classifier_on_constructed_maps():
    probs, q, src = constructed_maps()
    correct = torch.ones(len(q), dtype=torch.bool)
    correct_induction_head = correct.clone()
    ind, ret = profiling.copy_scores(probs, q, src, correct)
    local, sink = profiling.local_sink_scores(probs, window=8)
    # head 1's copies are marked wrong: an induction head that does not retrieve
    ret[0, 1] = profiling.copy_scores([probs[0][1:2]], q, src, ~correct_induction_head)[1][0, 0]
    types = [profiling.classify(float(ret[0, h]), float(ind[0, h]), 0.3, 0.3) for h in range(4)]
    assert types == ["retrieval", "induction", "local", "local"]
    assert local[0, 2] > 0.99 and sink[0, 3] > 0.99 and ret[0, 0] == 1.0


def test_profile_on_tiny_model(tiny, tmp_path):
    model, tok, d = tiny
    df = profiling.run_profile(d, str(tmp_path / "h.parquet"), n_prompts=1, copy_len=16, doc_length=256)
    assert set(df.columns) >= set(profiling.COLUMNS)
    assert len(df) == 4 * 4
    prof = profiling.read_profile(str(tmp_path / "h.parquet"), model)
    assert len(prof.types) == 4 and all(len(t) == 2 for t in prof.types)


def test_split_budget():
    assert split_budget(20, [1, 1], 5) == [10, 10]
    b = split_budget(64 * 2, [2.0, 0.5], 5)
    assert sum(b) == 128 and b[0] > b[1] >= 5


class FakeProfile:
    types = [["retrieval", "local"], ["local", "induction"], ["local", "local"], ["retrieval", "retrieval"]]


def run(tiny, doc, name, params, budget):
    model, tok, d = tiny
    p = Prompter(tok, d, "syn_src", "syn_tgt")
    sess = Session(model, method_from_config(name, params), budget, chunk_size=8, profile=FakeProfile())
    row = tasks.translate(sess, p, doc, k=3)
    return sess, row


def test_head_budgets_respected_and_bytes(tiny, docs):
    budget = 16
    sess, _ = run(tiny, docs[96][0], "head_aware", {}, budget)
    b = sess.budgets  # (L, H)
    assert (b.sum(1) == budget * 2).all() and b[0, 0] > b[0, 1]
    for i, s in enumerate(sess.stores):
        assert (s.live() <= b[i]).all()
    # allocated = every head its own budget + one spare slot (heads grouped by budget, no padding to
    # the largest head): the budget bytes plus one slot per head
    alloc = sum(int((b[i] + 1).sum()) for i in range(4)) * 64 * 2 * 4
    assert sess.memory.after_step_bytes[-1] == alloc
    assert alloc / sess.budget_bytes(budget) == (budget + 1) / budget
    assert sess.layout() == "grouped_per_head"


def test_equal_shares_equal_uniform(tiny, docs):
    eq = {"share_retrieval": 1.0, "share_induction": 1.0, "share_local": 1.0}
    a = run(tiny, docs[96][1], "head_aware", eq, 16)[1]
    b = run(tiny, docs[96][1], "uniform", {}, 16)[1]
    assert a["hypothesis"] == b["hypothesis"] and a["delays"] == b["delays"]


def test_head_aware_budget_above_length_is_full(tiny, docs):
    a = run(tiny, docs[96][0], "head_aware", {}, 4096)[1]
    b = run(tiny, docs[96][0], "full", {}, None)[1]
    assert a["hypothesis"] == b["hypothesis"]


def kept(sess):
    """Per layer, per KV head: the stream indices the cache holds."""
    return [[s.live_seq(h) for h in range(s.h)] for s in sess.stores]


def test_local_rule_h2o_with_equal_shares_is_h2o(tiny, docs):
    """local_rule: h2o makes every head run H2O inside its budget; with equal shares every head has the
    uniform budget, so each head keeps exactly H2O's tokens. With the default window rule the local
    heads keep sinks + the most recent tokens instead."""
    eq = {"share_retrieval": 1.0, "share_induction": 1.0, "share_local": 1.0, "local_rule": "h2o"}
    a = run(tiny, docs[96][1], "head_aware", eq, 16)
    b = run(tiny, docs[96][1], "h2o", {}, 16)
    assert a[1]["hypothesis"] == b[1]["hypothesis"] and kept(a[0]) == kept(b[0])
    w = run(tiny, docs[96][1], "head_aware", {**eq, "local_rule": "window"}, 16)
    n = w[0].seq  # stream length fed
    for li, layer in enumerate(FakeProfile.types):
        for h, typ in enumerate(layer):
            got = kept(w[0])[li][h]
            if typ == "local":
                assert got == list(range(4)) + list(range(n - 12, n))
            else:
                assert got == kept(b[0])[li][h]


def test_type_shortcut_equals_the_per_head_choice():
    """head_aware skips the rule no head of a view needs (host-side type names): on views all local,
    all non-local and mixed, unordered slots and random scores, the mask equals the per-head choice
    between the window and the heavy-hitter rule (`kinds` unknown: both rules, then torch.where)."""
    from kvbench.methods.base import LayerView

    g = torch.Generator().manual_seed(0)
    m = method_from_config("head_aware", {})
    h, c = 3, 40
    for kinds in (("local",) * 3, ("retrieval", "induction", "retrieval"), ("local", "retrieval", "local")):
        for trial in range(5):
            seq = torch.stack([torch.randperm(c, generator=g) for _ in range(h)])
            valid = torch.rand(h, c, generator=g) > 0.2
            score = torch.rand(h, c, generator=g)
            types = {t: torch.tensor([k == t for k in kinds]) for t in set(kinds)}
            budgets = torch.tensor([12, 9, 20])
            views = [LayerView(seq, seq, torch.zeros_like(seq), valid, score, ordered=False, types=types, kinds=k)
                     for k in (kinds, None)]
            fast, ref = (m.select(v, budgets) for v in views)
            assert torch.equal(fast, ref), (kinds, trial)
            window = method_from_config("streaming_llm", {}).select(views[1], budgets)
            for r, k in enumerate(kinds):  # and the choice is the type's rule
                if k == "local":
                    assert torch.equal(fast[r], window[r])


def test_head_budgets_follow_each_layers_types():
    """Per layer: budgets sum to the uniform total, every head keeps n_sink + 1, and the rest is split in
    proportion to the shares of the head's own type in its own layer (within one token)."""
    from types import SimpleNamespace

    types = [["retrieval", "induction", "local", "local"], ["local", "retrieval", "local", "induction"],
             ["induction", "induction", "retrieval", "local"], ["local", "local", "local", "local"]]
    m = method_from_config("head_aware", {})
    shares = {"retrieval": 2.0, "induction": 1.0, "local": 0.5}
    for budget in (16, 100, 1000):
        b = m.head_budgets(budget, 4, 4, SimpleNamespace(types=types))
        assert b.shape == (4, 4) and bool((b.sum(1) == budget * 4).all())
        for li, layer in enumerate(types):
            w = [shares[t] for t in layer]
            free = budget * 4 - 4 * (m.n_sink + 1)
            for h, t in enumerate(layer):
                assert abs(int(b[li, h]) - (m.n_sink + 1) - free * w[h] / sum(w)) < 1, (budget, li, h, t)
    u = method_from_config("uniform", {}).head_budgets(100, 4, 4, SimpleNamespace(types=types))
    assert bool((u == 100).all())  # the ablation partner: equal budgets, same total
