"""Head profiling pinned on planted heads: induction, retrieval (binding span) and the KV head's type.

Model tier: the profiler runs for real on the tiny model whose attention is planted per query head
(conftest.PlantedAttention, through the engine's own attention function): retrieval heads read the
name being produced where it occurred before, induction heads read the token after the previous
occurrence of the query's token, local heads the previous token, and "previous-occurrence" heads the
previous occurrence itself (one before the induction target: an induction score must not count it).
Unit tier: the copy-probe scores and the classifier on constructed attention maps.

    python -m pytest -q tests/test_alg_profile.py
"""

from __future__ import annotations

import random

import pytest
import torch

from kvbench import profiling
from kvbench.streams import ROLE_SOURCE, ROLE_TARGET


def test_planted_heads_get_their_scores_and_types(planted_profile, tiny):
    df = planted_profile.df
    assert len(df) == 16
    for r in df.itertuples():
        want = planted_profile.q_types[(r.layer, r.q_head)]
        where = f"layer {r.layer} q_head {r.q_head} (planted {want})"
        assert r.type == want, where
        # retrieval: every name step's argmax on the name's earlier occurrence, or never
        assert r.retrieval == pytest.approx(1.0 if want == "retrieval" else 0.0, abs=1e-6), where
        # induction: all the mass on the token after the previous occurrence; the heads that read the
        # previous occurrence itself (one token early) score nothing
        assert r.induction == pytest.approx(1.0 if want == "induction" else 0.0, abs=1e-4), where
    assert {(int(r.layer), int(r.q_head)) for r in df.itertuples() if r.induction < 0.5} >= planted_profile.previous


def test_kv_head_takes_the_strongest_type_of_its_query_heads(planted_profile, tiny):
    """GQA: a KV head's cache serves all its query heads, so it takes the strongest type among them
    (retrieval > induction > local), wherever that query head sits in the group."""
    df, kv_types = planted_profile.df, planted_profile.kv_types
    q = planted_profile.q_types
    # the construction has groups whose strongest head is the second one and groups whose weakest is first
    assert any(q[(li, 2 * kv)] != kv_types[li][kv] for li in range(4) for kv in range(2))
    assert any(q[(li, 2 * kv + 1)] != kv_types[li][kv] for li in range(4) for kv in range(2))
    for (layer, kv), g in df.groupby(["layer", "kv_head"]):
        assert sorted(g["q_head"]) == [2 * kv, 2 * kv + 1]
        assert set(g["kv_type"]) == {kv_types[layer][kv]}, (layer, kv, list(g["type"]))
    model, tok, d = tiny
    prof = profiling.read_profile(planted_profile.path, model)
    assert prof.types == kv_types
    assert {t for layer in prof.types for t in layer} == {"retrieval", "induction", "local"}


# ---- retrieval at the builtin task's name steps: the binding span ---------------------------------
def occurrence(info, t):
    """The name's last earlier occurrence (inside the span)."""
    return info.steps[t][-1] if t in info.steps else 0


def same_role_at(delta: int, inside: bool):
    """The key `delta` positions from an earlier occurrence, on its side (source or target), before the
    query; `inside` says whether it must be inside or outside every occurrence's binding span."""
    def rule(info, t):
        for i in reversed(info.steps.get(t, [])):
            j = info.at.get((info.role[i], info.pos[i] + delta))
            if j is not None and 0 < j < t and info.in_span(t, j) == inside:
                return j
        return 0
    rule.__name__ = f"same_role_at({delta:+d})"
    return rule


def other_role_in_range(info, t):
    """A key whose position is within [pos_i - 4, pos_i] of an occurrence i, but on the other side
    (GPE: source and target positions overlap): outside the span."""
    for i in reversed(info.steps.get(t, [])):
        other = ROLE_TARGET if info.role[i] == ROLE_SOURCE else ROLE_SOURCE
        for p in range(info.pos[i] - 4, info.pos[i] + 1):
            j = info.at.get((other, p))
            if j is not None and 0 < j < t and not info.in_span(t, j):
                return j
    return 0


def form(source: bool):
    """An earlier occurrence in the source form of the name (source=True) or in the form being produced."""
    def rule(info, t):
        for i in reversed(info.steps.get(t, [])):
            if (info.ids[i] != info.label[t]) == source:
                return i
        return 0
    rule.__name__ = f"form(source={source})"
    return rule


SPAN_RULES = {
    0: [occurrence, same_role_at(-4, True), same_role_at(-5, False), same_role_at(+1, False)],
    1: [other_role_in_range, form(source=True), form(source=False), same_role_at(-2, True)],
}


@pytest.mark.parametrize("seed", [0, 1])
def test_name_probe_counts_only_keys_in_the_binding_span(tiny, planted_attention, seed):
    """The retrieval score at name steps is the fraction of steps whose argmax key lies in the binding
    span of an earlier occurrence of the name (same side, positions pos_i - 4 .. pos_i): the occurrence,
    its source form, and the binding words before it count; a key one step outside (pos_i - 5, pos_i + 1)
    or at those positions on the other side does not."""
    model, tok, d = tiny
    planted = planted_attention(tok, SPAN_RULES)
    with planted.installed():
        hits = profiling.name_probe(model, tok, d, random.Random(seed), 512)
    info = planted.info
    steps = sorted(info.steps)
    assert hits is not None and len(steps) >= 4
    for layer, rules in SPAN_RULES.items():
        for h, rule in enumerate(rules):
            keys = [rule(info, t) for t in steps]
            found = sum(j != 0 for j in keys)
            want = sum(info.in_span(t, j) for t, j in zip(steps, keys) if j != 0) / len(steps)
            assert found >= 2, f"{rule.__name__}: the planted key exists at only {found} of {len(steps)} steps"
            assert float(hits[layer, h]) == pytest.approx(want, abs=1e-6), f"layer {layer} head {h}: {rule.__name__}"
    # the construction: the keys inside the span count wherever they exist, the outside ones never
    assert float(hits[0, 0]) == 1.0
    assert float(hits[0, 2]) == float(hits[0, 3]) == float(hits[1, 0]) == 0.0
    assert min(float(hits[0, 1]), float(hits[1, 1]), float(hits[1, 2]), float(hits[1, 3])) > 0


# ---- unit: copy-probe scores and the classifier ------------------------------------------------------
def test_copy_scores_on_constructed_maps():
    """Induction = mean attention exactly on `src` (the token after the previous occurrence); retrieval =
    fraction of steps whose argmax is `src` AND whose copy was produced."""
    t = 12
    q, src = torch.tensor([7, 8, 9]), torch.tensor([3, 4, 5])
    p = torch.zeros(5, t, t)
    p[:, torch.arange(t), torch.arange(t)] = 1.0  # rows not probed: attend to self
    for qi, si in zip(q.tolist(), src.tolist()):
        p[:, qi] = 0.0
        p[0, qi, si] = 1.0  # on the token after the previous occurrence
        p[1, qi, si - 1] = 1.0  # on the previous occurrence itself
        p[2, qi, si + 1] = 1.0  # one after
        p[3, qi, si], p[3, qi, qi] = 0.4, 0.6  # much mass there, argmax elsewhere
        p[4, qi, si], p[4, qi, 0] = 0.7, 0.3
    correct = torch.tensor([True, True, False])
    ind, ret = profiling.copy_scores([p], q, src, correct)
    assert ind.shape == ret.shape == (1, 5)
    assert torch.allclose(ind[0], torch.tensor([1.0, 0.0, 0.0, 0.4, 0.7]))
    assert torch.allclose(ret[0], torch.tensor([2 / 3, 0.0, 0.0, 0.0, 2 / 3]))
    # per layer: a second layer's map is scored on its own
    ind2, ret2 = profiling.copy_scores([p, p.flip(0)], q, src, correct)
    assert torch.allclose(ind2[1], ind[0].flip(0)) and torch.allclose(ret2[1], ret[0].flip(0))


def test_classify_priority_and_thresholds():
    c = lambda r, i: profiling.classify(r, i, 0.3, 0.3)  # noqa: E731
    assert c(0.3, 0.9) == "retrieval"  # retrieval first, threshold inclusive
    assert c(0.29, 0.3) == "induction"
    assert c(0.29, 0.29) == "local"
    assert profiling.TYPES == ("retrieval", "induction", "local")  # the priority a KV head's type follows


def test_copy_probe_indices_and_produced_copies(tiny, monkeypatch):
    """copy_probe scores the query at the copy of a[j] on the key a[j+1] first seen (induction target),
    and counts a retrieval step only when the model's prediction there is the copy's next token."""
    model, tok, _ = tiny

    def record(model, ids, pos, role):  # attention: each probed query on its induction target
        t = len(ids)
        n = (t - 1) // 2
        off = t - 2 * n
        p = torch.zeros(1, t, t)
        p[0, torch.arange(t), torch.arange(t)] = 1.0
        for j in range(n - 1):
            p[0, off + n + j] = 0.0
            p[0, off + n + j, off + j + 1] = 1.0
        pred = list(ids[1:]) + [ids[0]]  # a model that copies perfectly
        pred[off + n] = -1  # ... except at the first copy step
        return [p], pred

    monkeypatch.setattr(profiling, "_record", record)
    n = 10
    ind, ret, _ = profiling.copy_probe(model, tok, random.Random(0), n)
    assert float(ind[0, 0]) == 1.0  # every probed query sits on its induction target
    assert float(ret[0, 0]) == pytest.approx((n - 2) / (n - 1))  # one step's copy was not produced
