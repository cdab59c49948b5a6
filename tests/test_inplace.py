"""In-place eviction keeps exactly the entries the compacting store kept, at every step, for every
dense evicting method: the same (stream index, position, role) per head after every eviction of
every layer, through stepwise prefill chunks, GPE source/target groups and decode steps, with the
engine's shortcuts on (rowwise rules selecting for all layers at once, entries-only rules reusing a
layer's mask) against the compacting store selecting layer by layer; attention
reads the same entries, so the logits agree to float tolerance (only the summation order differs).
And it never reallocates: at budget B the buffers reach B + 1 slots once and stay there."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvbench.engine.session import Session
from kvbench.methods import method_from_config
from kvbench.streams import ROLE_SOURCE, ROLE_TARGET

METHODS = [
    ("streaming_llm", {"positions": "shifted"}),
    ("streaming_llm", {"positions": "cache"}),
    ("streaming_llm", {"positions": "original"}),
    ("streaming_llm", {"n_sink": 0, "positions": "original"}),
    ("h2o", {}),
    ("h2o", {"recent_ratio": 0.25}),
    ("head_aware", {}),
    ("head_aware", {"local_rule": "h2o"}),
    ("uniform", {}),
]
BUDGET = 20


def stream(n: int, vocab: int, seed: int = 0):
    """A wait-k-like stream: source words then target words alternating in runs, GPE positions (each
    group counts from 0), so position re-indexing sees two groups."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n,), generator=g)
    role, pos, counts = [], [], {ROLE_SOURCE: 0, ROLE_TARGET: 0}
    for i in range(n):
        r = ROLE_SOURCE if (i // 7) % 2 == 0 or i < 12 else ROLE_TARGET
        role.append(r)
        pos.append(counts[r])
        counts[r] += 1
    return ids, torch.tensor(pos), torch.tensor(role)


def mixed_profile(n_layers, n_heads):
    types = ("retrieval", "induction", "local")
    return SimpleNamespace(types=[[types[(li + h) % 3] for h in range(n_heads)] for li in range(n_layers)])


def entries(store) -> list[torch.Tensor]:
    """Per KV head (in head order, whatever part holds it): (3, n) seq, pos, role of its live entries,
    oldest first."""
    out = {}
    for heads, p in store.parts():
        for j in range(p.h):
            m = p.valid[j]
            order = torch.argsort(p.seq[j][m])
            h = j if heads is None else int(heads[j])
            out[h] = torch.stack([p.seq[j][m][order], p.pos[j][m][order], p.role[j][m][order].long()])
    return [out[h] for h in sorted(out)]


def run(model, mtype, params, inplace: bool, batched: bool | None = None):
    """Feed a stream in chunks (stepwise past the budget) then decode; record each layer's live
    entries per head, in stream order, after every eviction (a stepwise token's, layer by layer; a
    plain forward's, every layer at once), and the logits of every feed. batched (default: inplace):
    a rowwise rule selects for every layer at once after a plain forward (False: layer by layer)."""
    Session.inplace = inplace
    try:
        g = model.config
        prof = mixed_profile(g.num_hidden_layers, g.num_key_value_heads)
        sess = Session(model, method_from_config(mtype, params), BUDGET, chunk_size=16, profile=prof)
    finally:
        Session.inplace = True
    sess.batched = inplace if batched is None else batched  # read at every eviction
    log = []
    plain, stepwise = sess._evict, sess.step_evict

    def evict():
        plain()
        log.append((-1, [e for s in sess.stores for e in entries(s)]))

    def step_evict(layer, i):
        stepwise(layer, i)
        log.append((layer, entries(sess.stores[layer])))

    sess._evict, sess.step_evict = evict, step_evict
    ids, pos, role = stream(90, g.vocab_size)
    logits = [sess.feed(ids[:40], pos[:40], role[:40], logits="all"), sess.feed(ids[40:], pos[40:], role[40:], logits="all")]
    p, r = int(pos[-1]) + 1, ROLE_TARGET
    for _ in range(12):
        logits.append(sess.feed([int(logits[-1][-1].argmax())], [p], [r]))
        p += 1
    return sess, log, logits


@pytest.mark.parametrize("mtype,params", METHODS, ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for m, p in METHODS])
def test_inplace_keeps_the_same_entries_as_compacting(tiny, mtype, params):
    model = tiny[0]
    a_sess, a_log, a_logits = run(model, mtype, params, inplace=True)
    b_sess, b_log, b_logits = run(model, mtype, params, inplace=False)
    assert len(a_log) == len(b_log) > 50
    for (ia, ha), (ib, hb) in zip(a_log, b_log):
        assert ia == ib
        for h, (x, y) in enumerate(zip(ha, hb)):
            assert torch.equal(x, y), (mtype, params, ia, h, x[0].tolist(), y[0].tolist())
    for x, y in zip(a_logits, b_logits):
        assert torch.allclose(x, y, atol=1e-4, rtol=1e-4)
    assert any(not p.ordered for s in a_sess.stores for _, p in s.parts())  # freed slots were reused


def test_inplace_store_never_reallocates_after_reaching_its_budget(tiny):
    model = tiny[0]
    sess = Session(model, method_from_config("h2o", {}), BUDGET, chunk_size=16)
    ids, pos, role = stream(90, model.config.vocab_size)
    sess.feed(ids[:40], pos[:40], role[:40])
    bufs = [s._k.data_ptr() for s in sess.stores]
    assert all(s.capacity == BUDGET + 1 for s in sess.stores)
    sess.feed(ids[40:], pos[40:], role[40:])
    p = int(pos[-1]) + 1
    for i in range(10):
        sess.feed([5], [p + i], [ROLE_TARGET])
    assert [s._k.data_ptr() for s in sess.stores] == bufs
    assert all(s.capacity == BUDGET + 1 and max(s.n_live) == BUDGET for s in sess.stores)


@pytest.mark.parametrize("mtype", ["streaming_llm", "h2o", "uniform"])
def test_a_decode_step_selects_once_for_every_layer(tiny, mtype):
    """The shortcuts the entry test above proves exact are really taken: after a plain one-token
    forward a rowwise rule is called once for all layers (their heads stacked); with batching off, once
    per layer, except an entries-only rule (StreamingLLM), whose first layer's mask the others reuse."""
    model = tiny[0]
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    reuse = mtype == "streaming_llm"
    for batched, rows in ((True, [n_layers * n_heads]), (False, [n_heads] * (1 if reuse else n_layers))):
        sess, _, _ = run(model, mtype, {}, inplace=True, batched=batched)
        seen = []
        cls = type(sess.method)
        orig = cls.select
        cls.select = lambda self, view, b: seen.append(view.seq.shape[0]) or orig(self, view, b)
        try:
            sess.feed([5], [200], [ROLE_TARGET])
        finally:
            cls.select = orig
        assert seen == rows, (batched, seen)


def test_entries_only_reuse_checks_the_budgets(tiny):
    """A StreamingLLM whose layers give their two KV heads budgets B and B - 6 in alternating order
    (so every layer has the same slot count and, before its first eviction, the same entries as the
    one before): a layer may reuse the previous layer's mask only under the same budgets, so the
    entries still equal the compacting reference selecting layer by layer."""
    from kvbench.methods.streaming_llm import StreamingLLM

    def budgets_of(li):
        return [BUDGET, BUDGET - 6][::1 if li % 2 == 0 else -1]

    class Alternating(StreamingLLM):
        def head_budgets(self, budget, n_layers, n_heads, profile=None):
            assert n_heads == 2
            return torch.tensor([budgets_of(li) for li in range(n_layers)])

    model = tiny[0]
    ids, pos, role = stream(90, model.config.vocab_size)
    got = []
    for inplace in (True, False):
        Session.inplace = inplace
        try:
            sess = Session(model, Alternating(positions="shifted"), BUDGET, chunk_size=16)
        finally:
            Session.inplace = True
        sess.batched = inplace
        sess.feed(ids[:40], pos[:40], role[:40])
        sess.feed(ids[40:], pos[40:], role[40:])
        for i in range(5):
            sess.feed([5], [int(pos[-1]) + 1 + i], [ROLE_TARGET])
        got.append([entries(s) for s in sess.stores])
        assert [s.n_live for s in sess.stores] == [budgets_of(li) for li in range(len(sess.stores))]
        # and each layer's keys were rotated to its own positions (layers share a rotation table
        # only when they hold the same entries): the positions attention traced, per layer, equal the
        # rule's positions of that layer's entries before the step's eviction
        want, plain = [], sess._evict
        sess._evict = lambda: (want.extend((s.valid.clone(), sess.positions_of(s)) for s in sess.stores), plain())
        sess.cache.trace = []
        sess.feed([5], [int(pos[-1]) + 6], [ROLE_TARGET])
        assert len(sess.cache.trace) == len(want) == len(sess.stores)
        for t, (valid, p) in zip(sess.cache.trace, want):
            assert torch.equal(t["kpos"][valid], p[valid]), t["layer"]
    for a, b in zip(*got):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


QUANT = [("haq_kv", {"group_size": 8, "residual": 4}), ("stream_quant", {"group_size": 8, "residual": 4}),
         ("stream_quant", {"group_size": 8, "residual": 4, "evict": "streaming_llm"}),
         ("haq_kv", {"group_size": 8, "residual": 4, "evict": "recent"})]


@pytest.mark.parametrize("mtype,params", QUANT, ids=[f"{m}-{p.get('evict', 'h2o')}" for m, p in QUANT])
def test_quantized_stores_keep_the_same_entries_selected_layer_by_layer(tiny, mtype, params):
    """Quantized methods are rowwise too (their rules: H2O, sinks + window, window; the last two
    entries-only): selecting for every layer at once, and reusing a layer's mask, keeps exactly the
    entries of selecting layer by layer, and the logits are the same bits. The layers' queries are
    sharpened by different factors, so that their heavy hitters differ (random weights alone attend
    almost alike in every layer, and any layer's mask would then do)."""
    import copy

    model = copy.deepcopy(tiny[0])
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.q_proj.weight.mul_(4.0 * (i + 1))
    a_sess, a_log, a_logits = run(model, mtype, params, inplace=True, batched=True)
    b_sess, b_log, b_logits = run(model, mtype, params, inplace=True, batched=False)
    assert len(a_log) == len(b_log) > 50
    for (ia, ha), (ib, hb) in zip(a_log, b_log):
        assert ia == ib and all(torch.equal(x, y) for x, y in zip(ha, hb)), (mtype, params, ia)
    assert all(torch.equal(x, y) for x, y in zip(a_logits, b_logits))
