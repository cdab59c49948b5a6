"""Quantized storage (QuantKVStore) and the methods on it (haq_kv, stream_quant).

Store level (random tensors): bytes == theory, dequantization error <= scale / 2, eviction inside
packed groups keeps exactly the selected tokens, sinks and an injected outlier at high precision.
Model level (tiny random model): all bits 16 == the full cache, per-head budgets after every step,
all four tasks at a tight budget, bytes relative to the fp32 full cache.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvbench import tasks
from kvbench.engine.qstore import ChannelKeys, QuantKVStore, SinkOutlierFlags, bytes_bound, max_tokens
from kvbench.engine.session import Session
from kvbench.methods import haq_kv, method_from_config, stream_quant  # noqa: F401  (registration)
from kvbench.methods.base import REGISTRY
from kvbench.prompt import Prompter

from conftest import builtin_tasks, task_doc
from kvbench.quant import quantized_nbytes

CPU = torch.device("cpu")
TYPES = ["retrieval", "local", "induction", "local", "local", "retrieval", "induction", "induction"]
PROFILE = SimpleNamespace(types=[TYPES[2 * i: 2 * i + 2] for i in range(4)])  # (L=4, H=2) like the tiny model
TP = {"wait_k": 3, "n_decode": 2, "warmup": 0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and polite to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def prompter(tiny):
    model, tok, d = tiny
    return Prompter(tok, d, "syn_src", "syn_tgt")


def feed(store, chunks, d=64, seed=0, outlier=None):
    """Append random (H, n, D) chunks; returns {seq: (k (H, D), v (H, D))} of what was appended."""
    g = torch.Generator().manual_seed(seed)
    ref, s0 = {}, int(store.seq.max()) + 1 if store.seq.numel() else 0
    for n in chunks:
        k, v = torch.randn(store.h, n, d, generator=g), torch.randn(store.h, n, d, generator=g)
        seq = torch.arange(s0, s0 + n)
        if outlier is not None and s0 <= outlier < s0 + n:
            k[:, outlier - s0] *= 20.0
        store.append(k, v, seq, seq, torch.ones(n, dtype=torch.long))
        for i in range(n):
            ref[s0 + i] = (k[:, i], v[:, i])
        s0 += n
    return ref


def theory(store) -> int:
    """codes + scales + zeros + residual from the tier counts, via quant.quantized_nbytes."""
    d, g, dt, total = store.d, store.g, store.dtype, 0
    for h, c in enumerate(store.counts()):
        kb, vb = store.key_bits[h], store.value_bits[h]
        total += sum(quantized_nbytes((c["hi"], d), b, g, "token", dtype=dt) for b in store.hi_bits)
        if kb == 16:
            total += quantized_nbytes((c["body"], d), 16, g, "channel", dtype=dt)
        else:
            assert sum(c["groups"]) == c["body"]
            total += sum(quantized_nbytes((n, d), kb, n, "channel") for n in c["groups"])
        total += quantized_nbytes((c["body"], d), vb, g, "token", dtype=dt)
        total += 2 * c["res"] * d * torch.empty(0, dtype=dt).element_size()
    return total


def store_of(kb, vb, g=16, r=4, scores=False, **kw):
    return QuantKVStore(2, 64, torch.float32, CPU, kb, vb, g, r, track_scores=scores, **kw)


def by_seq(store, h):
    """{seq: slot} of head h's live slots."""
    return {int(s): i for i, s in enumerate(store.seq[h].tolist()) if store.valid[h, i]}


CONFIGS = [([2, 4], [2, 4], 16, 4), ([8, 3], [4, 2], 32, 0), ([16, 2], [16, 8], 16, 20), ([4, 4], [2, 2], 64, 7)]


@pytest.mark.parametrize("kb,vb,g,r", CONFIGS)
def test_bytes_equal_theory_at_every_step(kb, vb, g, r):
    store = store_of(kb, vb, g, r)
    n = 0
    for chunk in [5, 1, 17, 1, 1, 40, 3, 64, 1]:
        feed(store, [chunk], seed=n)
        n += chunk
        assert store.nbytes() == theory(store)
        for c in store.counts():  # no eviction: all groups whole, residual in [r, r + g)
            assert c["body"] == max(n - r, 0) // g * g and c["res"] == n - c["body"]
    torch.manual_seed(1)
    for _ in range(6):  # scattered eviction (merges) keeps the accounting exact and within the bound
        store.compact(torch.rand(store.valid.shape) < 0.8)
        assert store.nbytes() == theory(store)
        for h, hd in enumerate(store.heads):
            assert hd.nbytes() <= bytes_bound(int(store.live()[h]), **store.cost_args(h))
            if isinstance(hd.bk, ChannelKeys):
                assert sum(1 for s in hd.bk.size.tolist() if s < g) <= 2
        feed(store, [9], seed=100 + _)
        assert store.nbytes() == theory(store)


def body_scales(store, h):
    """Per live slot of head h: key scale (D,) and value scale (D,) of its body group, else None."""
    hd, a = store.heads[h], store.heads[h].n_hi
    ks = hd.bk.s.float().repeat_interleave(hd.bk.size, dim=0)  # (n_b, D)
    vs = hd.bv.s.float().repeat_interleave(store.g, dim=1)  # (n_b, D)
    return {a + i: (ks[i], vs[i]) for i in range(hd.n_body)}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequant_error_within_half_scale(bits):
    store = store_of([bits, bits], [bits, bits], 16, 8)
    ref = feed(store, [13, 30, 1, 1, 50])
    K, V = store.keys_values()
    for h in range(2):
        sc = body_scales(store, h)
        assert len(sc) == 80
        for s, i in by_seq(store, h).items():
            k, v = ref[s][0][h], ref[s][1][h]
            if i in sc:
                ks, vs = sc[i]
                assert ((K[h, i] - k).abs() <= ks / 2 + 1e-5 * (k.abs() + ks)).all()
                assert ((V[h, i] - v).abs() <= vs / 2 + 1e-5 * (v.abs() + vs)).all()
            else:  # residual: full precision
                assert torch.equal(K[h, i], k) and torch.equal(V[h, i], v)


def test_eviction_inside_groups_keeps_exactly_the_selection():
    store = store_of([2, 4], [2, 4], 16, 4)
    feed(store, [70])  # 64 body tokens (4 groups) + 6 residual per head
    K0, V0 = store.keys_values()
    before = [{s: (K0[h, i], V0[h, i]) for s, i in by_seq(store, h).items()} for h in range(2)]
    # sliding window with 4 sinks (StreamingLLM-like): partial groups, no re-quantization at all
    keep = store.valid & ((store.seq < 4) | (store.seq >= 20))
    store.compact(keep)
    K, V = store.keys_values()
    for h in range(2):
        assert sorted(by_seq(store, h)) == list(range(4)) + list(range(20, 70))
        for s, i in by_seq(store, h).items():
            assert torch.equal(K[h, i], before[h][s][0]) and torch.equal(V[h, i], before[h][s][1])
        assert store.counts()[h]["groups"] == [4, 12, 16, 16]
    # scattered eviction (H2O-like): partial groups merge; keys move by <= new scale / 2, values exact
    K0, V0 = store.keys_values()
    before = [{s: (K0[h, i], V0[h, i]) for s, i in by_seq(store, h).items()} for h in range(2)]
    torch.manual_seed(0)
    keep = store.valid & (torch.rand(store.valid.shape) < 0.7)
    want = [sorted(int(s) for s in store.seq[h][keep[h]]) for h in range(2)]
    store.compact(keep)
    K, V = store.keys_values()
    for h in range(2):
        assert sorted(by_seq(store, h)) == want[h]
        sc = body_scales(store, h)
        for s, i in by_seq(store, h).items():
            assert torch.equal(V[h, i], before[h][s][1])
            tol = sc[i][0] / 2 + 1e-5 if i in sc else 0.0
            assert ((K[h, i] - before[h][s][0]).abs() <= tol).all()
    assert store.nbytes() == theory(store)


def store_state(st):
    """Everything a QuantKVStore holds, as comparable tensors and ints."""
    out = {n: getattr(st, n) for n in ("seq", "pos", "role", "valid", "flag", "score") if getattr(st, n) is not None}
    out["n_live"] = list(st.n_live)
    for h, hd in enumerate(st.heads):
        out[h] = (hd.n_hi, hd.n_body, hd.rk, hd.rv, *[getattr(t, a) for t in (hd.hk, hd.hv, hd.bk, hd.bv)
                                                       for a in ("q", "s", "z", "size") if hasattr(t, a)])
    return out


def entries(st, h, mask):
    """{seq: (pos, role, flag, score)} of head h's slots where mask (C,) is True."""
    cols = [getattr(st, f)[h][mask].tolist() for f in ("seq", "pos", "role", "flag", "score")]
    return {c[0]: tuple(c[1:]) for c in zip(*cols)}


@pytest.mark.parametrize("kb", [2, 16])
def test_few_evictions_cut_around_slots_like_the_general_path(kb, monkeypatch):
    """compact() of a few slots per head (cut around them on the host: Rows.drop, ChannelKeys.drop,
    the metadata by one mask) leaves the store exactly as the general path (index_select, keep,
    _regather) does: 40 rounds of 1-3 evictions per head anywhere (hi tier, body, residual; the
    same or different counts per head; merges due), new tokens appended between them."""
    import kvbench.engine.qstore as qs
    flags = lambda: SinkOutlierFlags(n_sink=3, decay=0.9, threshold=1.2, detect=True)  # noqa: E731
    a, b = (store_of([kb, 4], [2, 4], 8, 3, hi_bits=(8, 16), max_hi=6, flagger=flags(), scores=True)
            for _ in range(2))
    for st in (a, b):
        feed(st, [40, 7])
    g = torch.Generator().manual_seed(3)
    fast = []
    spy = qs.QuantKVStore._drop
    monkeypatch.setattr(qs.QuantKVStore, "_drop", lambda self, *x: fast.append(spy(self, *x)) or fast[-1])
    died = []
    cut = qs._cut
    monkeypatch.setattr(qs, "_cut", lambda t, rows: died.append(t.shape[1] == 64 and t.dtype == torch.float16) or cut(t, rows))
    for r in range(40):
        keep = a.valid.clone()
        for h in range(2):
            live = keep[h].nonzero().squeeze(1)
            n = 1 + int(torch.randint(0, 3, (1,), generator=g)) if r % 3 else 2
            keep[h, live[torch.randperm(live.numel(), generator=g)[:n]]] = False
            sizes = a.counts()[h]["groups"]
            small = [i for i, x in enumerate(sizes) if x <= 3]
            if r % 4 == 3 and small:  # a partial key group loses its last tokens: its scale and zero go
                start = a.heads[h].n_hi + sum(sizes[:small[0]])
                keep[h] = a.valid[h]
                keep[h, start:start + sizes[small[0]]] = False
        before = {h: entries(a, h, keep[h]) for h in range(2)}
        a.compact(keep)
        for h in range(2):  # each head holds its kept entries, then zeroed padding
            n = a.n_live[h]
            assert entries(a, h, a.valid[h]) == before[h] and bool(a.valid[h, :n].all()), (r, h)
            assert all(not getattr(a, f)[h, n:].any() for f in ("seq", "pos", "role", "valid", "flag", "score"))
        assert a.seq.shape[1] == max(a.n_live)
        with monkeypatch.context() as m:
            m.setattr(qs, "FEW", 0)
            b.compact(keep)
        sa, sb = store_state(a), store_state(b)
        assert sa.keys() == sb.keys()
        for key in sa:
            x, y = sa[key], sb[key]
            if isinstance(x, tuple):
                assert len(x) == len(y) and all(torch.equal(u, v) if torch.is_tensor(u) else u == v
                                                for u, v in zip(x, y)), (r, key)
            else:
                assert torch.equal(x, y) if torch.is_tensor(x) else x == y, (r, key)
        assert a.nbytes() == theory(a)
        for st in (a, b):
            feed(st, [1 + r % 4], seed=r + 1)
            tiers = [t for hd in st.heads for t in (hd.rk, hd.rv, *[getattr(x, n) for x in (hd.hk, hd.hv, hd.bk, hd.bv)
                                                                   for n in ("q", "s", "z", "size") if hasattr(x, n)])]
            assert all(t.is_contiguous() for t in tiers)  # what the C kernels read through raw pointers
    assert fast.count(True) > 20 and (kb == 16 or False in fast)  # both ways were taken
    assert kb == 16 or any(died), "no key group lost its last token on the fast path"


@pytest.mark.parametrize("hi", [8, 16])
def test_sinks_and_injected_outlier_at_high_precision(hi):
    flags = SinkOutlierFlags(n_sink=4, decay=0.9, threshold=3.0, detect=True)
    store = store_of([2, 2], [2, 2], 16, 4, hi_bits=(hi, hi), max_hi=4 + 2, flagger=flags)
    ref = feed(store, [8] * 12, outlier=40)
    K, V = store.keys_values()
    for h, c in enumerate(store.counts()):
        assert c["hi"] == 5
        slots = by_seq(store, h)
        hi_seq = sorted(s for s, i in slots.items() if i < c["hi"])
        assert hi_seq == [0, 1, 2, 3, 40]
        for s in hi_seq:
            k, v = ref[s][0][h], ref[s][1][h]
            if hi == 16:
                assert torch.equal(K[h, slots[s]], k) and torch.equal(V[h, slots[s]], v)
            else:  # 8 bits per token: error <= (range / 255) / 2, far below a 2-bit channel group's
                for x, y in ((K[h, slots[s]], k), (V[h, slots[s]], v)):
                    assert (x - y).abs().max() <= (y.max() - y.min()) / 255 / 2 * 1.01
    assert store.nbytes() == theory(store)
    assert flags.ema is not None and flags.ema.shape == (2,)


def test_outlier_flags_follow_the_ema_recursion_in_any_chunking():
    """SinkOutlierFlags against the rule written as a loop (float64): the first n_sink tokens are
    sinks; a later token is an outlier when its key norm > threshold x the EMA, and only ordinary
    tokens update the EMA (ema = decay * ema + (1 - decay) * norm), seeded by the first chunk's
    median. Fed one token at a time (a decode step's branch) and in chunks (the closed form), the
    flags are the loop's and the EMA agrees to float32 rounding."""
    g = torch.Generator().manual_seed(5)
    n, n_sink, decay, thr = 120, 4, 0.9, 3.0
    k = torch.randn(2, n, 64, generator=g)
    k[:, [30, 31, 77]] *= 6.0  # outliers (norms ~6x the rest)
    k[1, 50] *= 8.0  # one head only
    seed = 10  # the first chunk: tokens 0..9 in both feeds, so both seed the same median
    norm = k.double().norm(dim=-1)
    ema = norm[:, n_sink:seed].median(dim=1).values.clone()
    want = torch.zeros(2, n, dtype=torch.bool)
    want[:, :n_sink] = True
    for t in range(n_sink, n):
        for h in range(2):
            if norm[h, t] > thr * ema[h]:
                want[h, t] = True
            else:
                ema[h] = decay * ema[h] + (1 - decay) * norm[h, t]
    for chunks in ([seed] + [1] * (n - seed), [seed, 7, 1, 1, 13, 1, 40, 1, 1, 45]):
        f = SinkOutlierFlags(n_sink, decay, thr, detect=True)
        got, s0 = [], 0
        for c in chunks:
            got.append(f(k[:, s0:s0 + c], torch.arange(s0, s0 + c)))
            s0 += c
        assert s0 == n
        assert torch.equal(torch.cat(got, dim=1), want), chunks
        assert torch.allclose(f.ema.double(), ema, rtol=1e-5), chunks
    assert want[:, n_sink:].sum() >= 7  # outliers were flagged


class AlwaysFlush(QuantKVStore):
    """The reference: every append runs the flush and the slot rebuild, whether or not anything moves."""

    def _flushes(self, hd, n, flag) -> bool:
        return True


def test_skipped_flushes_change_nothing():
    """append skips the flush (and the slot rebuild) when nothing leaves the residual window: the
    store then equals one that always flushes, slot for slot, after every append and eviction
    (outliers and sinks to the hi tier until it is full, scattered evictions merging key groups)."""
    torch.manual_seed(0)
    kw = dict(hi_bits=(8, 8), max_hi=6)
    a = store_of([2, 4], [2, 4], 8, 5, **kw, flagger=SinkOutlierFlags(4, 0.9, 3.0, True))
    b = AlwaysFlush(2, 64, torch.float32, CPU, [2, 4], [2, 4], 8, 5, **kw, flagger=SinkOutlierFlags(4, 0.9, 3.0, True))
    g = torch.Generator().manual_seed(3)
    calls, peak_hi = {}, 0
    for name, st in (("a", a), ("b", b)):
        def counted(hd, flag, _f=st._flush, _n=name):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(hd, flag)
        st._flush = counted
    for step, n in enumerate([6, 1, 1, 9, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 20] * 3):
        k, v = torch.randn(2, n, 64, generator=g), torch.randn(2, n, 64, generator=g)
        if step % 5 == 2:
            k[:, -1] *= 25.0  # an outlier key
        s0 = int(a.seq.max()) + 1 if a.seq.numel() else 0
        seq = torch.arange(s0, s0 + n)
        for st in (a, b):
            st.append(k, v, seq, seq, torch.ones(n, dtype=torch.long))
        if step % 4 == 3 and a.seq.shape[1] > 24:  # scattered eviction (H2O-like), the same on both
            keep = torch.rand(a.valid.shape, generator=g) > 0.25
            a.compact(keep), b.compact(keep)
        assert a.counts() == b.counts(), step
        for x, y in zip(a.keys_values(), b.keys_values()):
            assert torch.equal(x, y), step
        for name in ("seq", "pos", "role", "valid", "flag"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (step, name)
        assert a.n_live == b.n_live and a.nbytes() == b.nbytes() == theory(a)
        peak_hi = max(peak_hi, sum(c["hi"] for c in a.counts()))
    assert calls["a"] < 0.6 * calls["b"]  # skips happened (evictions leave heads ragged: those appends rebuild)
    assert peak_hi > 8  # sinks (4 per head) and outliers did reach the hi tier


def mk(name, **kw):
    return method_from_config(name, kw)


ALL16 = [("haq_kv", dict(bits_retrieval=16, bits_induction=16, bits_local=16, group_size=16, residual=4), None),
         ("haq_kv", dict(bits_retrieval=16, bits_induction=16, bits_local=16, evict="recent"), 4096),
         ("stream_quant", dict(key_bits_normal=16, value_bits_normal=16, key_bits_sink_outlier=16,
                               value_bits_sink_outlier=16, group_size=16, residual=4), 4096)]


@pytest.fixture(scope="module")
def full_refs(tiny, docs):
    model, tok, d = tiny
    return {t: tasks.run_task(t, Session(model, mk("full"), None, 16), prompter(tiny), docs[96][0], TP)
            for t in ("translate_stream", "ppl")}


@pytest.mark.parametrize("name,kw,budget", ALL16)
def test_all_16_bits_equals_full(tiny, docs, full_refs, name, kw, budget):
    model, tok, d = tiny
    doc, p = docs[96][0], prompter(tiny)
    for task, ref in full_refs.items():
        sess = Session(model, mk(name, **kw), budget, 16, PROFILE)
        got = tasks.run_task(task, sess, p, doc, TP)
        assert sess.layout() == "packed_quant" and sess.compute() == "dequantized"
        if task == "ppl":
            assert abs(got["nll_sum"] - ref["nll_sum"]) <= 1e-4 * max(1.0, abs(ref["nll_sum"]))
        else:
            assert got["hypothesis"] == ref["hypothesis"] and got["delays"] == ref["delays"]


class CheckedSession(Session):
    """Asserts the per-head token and byte budgets after every eviction step."""

    def _evict(self):
        super()._evict()
        if self.budgets is None:
            return
        for i, s in enumerate(self.stores):
            tokens = self.keep[i]
            assert bool((s.live() <= tokens).all()), (i, s.live(), tokens)
            assert bool((tokens >= self.budgets[i]).all())
            allowance = self.budget_bytes(1) // (self.geom["n_layers"] * self.geom["n_kv_heads"])
            for h, hd in enumerate(s.heads):
                assert hd.nbytes() <= int(self.budgets[i, h]) * allowance
        self.checked = getattr(self, "checked", 0) + 1


QMETHODS = [("haq_kv", dict(group_size=16, residual=4)),
            ("haq_kv", dict(group_size=16, residual=2, evict="streaming_llm")),
            ("stream_quant", dict(group_size=16, residual=4, key_bits_normal=2)),
            ("stream_quant", dict(group_size=32, residual=0, evict="h2o", outlier_threshold_relative=1.2))]
MATRIX = [(*q, t) for q in QMETHODS for t in builtin_tasks()]


@pytest.mark.parametrize("name,kw,task", MATRIX)
def test_four_tasks_tight_budget(tiny, docs, haystacks, name, kw, task):
    model, tok, d = tiny
    budget = 24
    sess = CheckedSession(model, mk(name, **kw), budget, 8, PROFILE)
    row = tasks.run_task(task, sess, prompter(tiny), task_doc(task, docs, haystacks, 96, 1), TP)
    assert row and sess.checked > 0
    assert all(b <= sess.budget_bytes(budget) for b in sess.memory.after_step_bytes)
    assert sess.memory.retained_peak > budget  # quantized: more tokens than B in B's bytes
    if name == "stream_quant":
        for s in sess.stores:  # the sinks stay in the high-precision tier of every head
            for h, c in enumerate(s.counts()):
                assert set(range(4)) <= set(s.seq[h, : c["hi"]].tolist())


def test_haq_kv_bits_follow_head_types(tiny, docs):
    model, tok, d = tiny
    m = mk("haq_kv", group_size=16, residual=4)
    sess = Session(model, m, 24, 8, PROFILE)
    tasks.run_task("ppl", sess, prompter(tiny), docs[192][0], TP)
    want = {"retrieval": 8, "induction": 4, "local": 2}
    for i, s in enumerate(sess.stores):
        assert s.key_bits == s.value_bits == [want[t] for t in PROFILE.types[i]]
        live = dict(zip(PROFILE.types[i], s.live().tolist()))
        if "local" in live and "retrieval" in live:
            assert live["local"] > live["retrieval"]


def test_byte_ratio_vs_fp32_full(tiny, docs):
    model, tok, d = tiny
    doc, p = docs[192][0], prompter(tiny)
    full = Session(model, mk("full"), None, 64)
    tasks.run_task("ppl", full, p, doc, TP)
    n = full.tokens
    fb = full.budget_bytes(n)  # n fp32 tokens (the full cache's buffers may hold a few spare slots)
    assert fb <= full.memory.after_step_bytes[-1] <= fb * 33 / 32 + full.budget_bytes(1)
    for r in (32, 0):
        ratios = {}
        for b in (2, 4, 8):
            m = mk("haq_kv", bits_retrieval=b, bits_induction=b, bits_local=b, group_size=32, residual=r)
            sess = Session(model, m, None, 64, PROFILE)
            tasks.run_task("ppl", sess, p, doc, TP)
            ratios[b] = sess.memory.after_step_bytes[-1] / fb
            assert theory(sess.stores[0]) * 4 == sess.memory.after_step_bytes[-1]
            # body: (b + 32 / G) bits per element over fp32's 32, plus <= r + G - 1 fp32 tokens
            assert (b + 1) / 32 <= ratios[b] + 1e-9 and ratios[b] <= (b + 1) / 32 + (r + 31) / n
        print(f"\nhaq_kv bytes / fp32 full cache, {n} tokens, G=32, residual={r}: "
              + ", ".join(f"{b}b={x:.4f}" for b, x in ratios.items()))
        assert ratios[2] < ratios[4] < ratios[8] < 0.5


def test_token_conversion():
    kw = dict(d=64, dtype=torch.float32, group_size=16, residual=4)
    t = {b: max_tokens(24 * 2 * 64 * 4, key_bits=b, value_bits=b, **kw) for b in (2, 4, 8, 16)}
    assert t[16] == 24 and t[2] > t[4] > t[8] > 24
    for b, n in t.items():
        bound = [bytes_bound(m, key_bits=b, value_bits=b, **kw) for m in (n, n + 1)]
        assert bound[0] <= 24 * 512 < bound[1]


def test_registered_and_validation(tiny):
    model, tok, d = tiny
    assert {"haq_kv", "stream_quant"} <= set(REGISTRY)
    for name, kw, match in [
        ("haq_kv", dict(bits_local=5), r"bits_local must be one of \(2, 3, 4, 8, 16\)"),
        ("haq_kv", dict(evict="lru"), "evict must be one of"),
        ("stream_quant", dict(key_bits_sink_outlier=4), r"key_bits_sink_outlier must be one of \(8, 16\)"),
        ("stream_quant", dict(value_bits_normal=1), r"value_bits_normal must be one of \(2, 3, 4, 8, 16\)"),
        ("stream_quant", dict(attention_sink_size=30), "n_sink"),
    ]:
        with pytest.raises(ValueError, match=match):
            mk(name, **kw).validate(24)
    with pytest.raises(ValueError, match="group_size 48 does not divide head_dim 64"):
        Session(model, mk("haq_kv", group_size=48), 24, 8, PROFILE)
    with pytest.raises(ValueError, match="needs a head profile"):
        Session(model, mk("haq_kv"), 24, 8, None)
    assert REGISTRY["haq_kv"].needs_profile and not REGISTRY["stream_quant"].needs_profile
