"""Engine properties on a tiny random-weight model: exactness, kept sets, bytes, GPE, and the method
matrix: every registered method x {budget above the length, tight budget} on a mixed head profile."""

from __future__ import annotations

import pytest
import torch

from kvbench import streams, tasks
from kvbench.engine.session import Session
from kvbench.methods import REGISTRY, method_from_config
from kvbench.prompt import Prompter

from conftest import builtin_tasks, task_doc

METHODS = sorted(REGISTRY)  # the matrix: every registered method type, at its defaults
LOSSY = sorted(n for n, c in REGISTRY.items() if c.storage != "dense")  # low-bit storage: never exact


def prompter(tiny, translate=True):
    model, tok, d = tiny
    return Prompter(tok, d, "syn_src", "syn_tgt") if translate else Prompter(tok, d, None, None)


def stream_logits_reference(model, s: streams.Stream) -> torch.Tensor:
    """Plain transformers forward of a whole stream with an explicit 4-D GPE mask (sdpa)."""
    ids, pos, role = s.tensors()
    mask = streams.stream_mask(role)
    add = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)[None, None]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return model(input_ids=ids[None], position_ids=pos[None], attention_mask=add).logits[0]


def test_full_equals_plain_forward(tiny, docs):
    model, tok, d = tiny
    s, _ = tasks.document_stream(prompter(tiny), docs[192][0], k=3)
    ref = stream_logits_reference(model, s)
    sess = Session(model, method_from_config("full", {}), None, chunk_size=17)
    out = torch.cat([sess.feed(s.ids[a : a + 17], s.pos[a : a + 17], s.role[a : a + 17], logits="all")
                     for a in range(0, len(s.ids), 17)])
    assert (out - ref).abs().max() < 1e-5


@pytest.fixture(scope="module")
def mixed_profile(tiny, planted_profile):
    """The tiny model's head profile from the profiler run on planted heads: retrieval, induction and
    local KV heads (read back from its Parquet like an eval job does)."""
    from kvbench.profiling import read_profile

    prof = read_profile(planted_profile.path, tiny[0])
    assert {t for layer in prof.types for t in layer} == {"retrieval", "induction", "local"}
    return prof


def stream_logits(sess: Session, s: streams.Stream, chunk: int = 16) -> torch.Tensor:
    """(T, V) logits of every token of a teacher-forced stream, fed in chunks as perplexity feeds it."""
    return torch.cat([sess.feed(s.ids[a:a + chunk], s.pos[a:a + chunk], s.role[a:a + chunk], logits="all")
                      for a in range(0, len(s.ids), chunk)])


@pytest.fixture(scope="module")
def full_refs(tiny, docs):
    """The full cache's translation (wait-3) and its logits on the teacher-forced stream of docs[96][0]."""
    model, tok, d = tiny
    doc = docs[96][0]
    row = tasks.run_task("translate_stream", Session(model, method_from_config("full", {}), None, 16),
                         prompter(tiny), doc, {"wait_k": 3})
    s, _ = tasks.document_stream(prompter(tiny), doc, k=3)
    return dict(translate_stream=row, logits=stream_logits(Session(model, method_from_config("full", {}), None), s))


def test_matrix_has_every_registered_method():
    assert METHODS == sorted(REGISTRY) and len(METHODS) >= 7
    assert set(LOSSY) == {"haq_kv", "stream_quant"}  # the registered methods that store keys at low bits


class BudgetChecked(Session):
    """A session that checks every head's budget after each eviction step (every prefill chunk and
    decode step): tokens for dense storage, tokens and bytes (the head's byte allowance) for quantized."""

    steps = 0

    def _evict(self):
        super()._evict()
        self.steps += 1
        if self.budgets is None:
            return
        g = self.geom
        per_token = self.budget_bytes(1) // (g["n_layers"] * g["n_kv_heads"])  # one token's K+V of one head
        for i, s in enumerate(self.stores):
            if self.method.storage == "dense":
                assert bool((s.live() <= self.budgets[i]).all()), (i, s.live(), self.budgets[i])
                continue
            tokens = self.keep[i]
            assert bool((s.live() <= tokens).all()), (i, s.live(), tokens)
            for h, hd in enumerate(s.heads):
                assert hd.nbytes() <= int(self.budgets[i, h]) * per_token, (i, h)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("task", ["translate_stream", "logits"])
def test_budget_above_length_is_full(tiny, docs, mixed_profile, full_refs, name, task):
    """A budget above the stream length evicts nothing, and every method that stores K/V exactly then
    reproduces the full cache: the same hypothesis and delays, and the same logits for every token of the
    teacher-forced stream (float rounding only: the score-tracking attention path sums in another order)."""
    model, tok, d = tiny
    sess = BudgetChecked(model, method_from_config(name, {}), 4096, 16, profile=mixed_profile)
    if task == "logits":
        s, _ = tasks.document_stream(prompter(tiny), docs[96][0], k=3)
        got = stream_logits(sess, s)
    else:
        got = tasks.run_task(task, sess, prompter(tiny), docs[96][0], {"wait_k": 3})
    assert sess.tokens > 0 and all(s.n_live == [sess.tokens] * s.h for s in sess.stores)  # nothing evicted
    if sess.budgets is not None:
        assert int(sess.budgets.min()) >= sess.tokens  # every head's budget (head-aware shares too)
    if name in LOSSY:
        return
    ref = full_refs[task]
    if task == "logits":
        assert (got - ref).abs().max() < 1e-5
    else:
        assert got["hypothesis"] == ref["hypothesis"] and got["delays"] == ref["delays"]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("task", builtin_tasks())
def test_matrix_tight_budget_runs_and_respects_budget(tiny, docs, haystacks, mixed_profile, name, task):
    model, tok, d = tiny
    budget = 24
    method = method_from_config(name, {})
    sess = BudgetChecked(model, method, budget, chunk_size=8, profile=mixed_profile)
    row = tasks.run_task(task, sess, prompter(tiny), task_doc(task, docs, haystacks, 96, 1),
                         {"wait_k": 3, "n_decode": 2, "warmup": 0, "n_depths": 2})
    assert row and sess.steps > 0
    if not method.evicts:
        return
    n_layers, n_heads = len(sess.stores), sess.stores[0].h
    # per-head budgets redistribute the uniform total, never add to it
    assert sess.budgets.shape == (n_layers, n_heads) and bool((sess.budgets.sum(1) == budget * n_heads).all())
    assert sess.tokens > budget + 16  # so the cache really was evicted, many times
    full_bytes = sess.budget_bytes(budget)
    if method.storage != "dense":  # quantized: within the budget's bytes after every step, holding more tokens
        assert all(b <= full_bytes for b in sess.memory.after_step_bytes)
        assert sess.memory.retained_peak > budget
        return
    # dense: after every step, once full, each head holds its own budget + the one spare slot an
    # evicting store keeps for the token being written (per-head budgets: heads grouped by budget, no
    # padding to the largest head). With uniform budgets that is the budget bytes (fp32 here) plus one slot.
    slot = full_bytes // budget // n_layers // n_heads  # one token of one head
    alloc = sum(int((b + 1).sum()) for b in sess.budgets) * slot
    steady = [b for b in sess.memory.after_step_bytes if b >= full_bytes]
    assert steady and all(b <= alloc for b in steady)
    assert sess.memory.after_step_bytes[-1] == alloc
    if method.layout == "dense":
        assert alloc == full_bytes + full_bytes // budget
    for s, b in zip(sess.stores, sess.budgets):
        for heads, p in s.parts():
            bb = b if heads is None else b[heads]
            assert p.capacity == int(bb.max()) + p.reserve
        assert s.nbytes() == int((b + 1).sum()) * 2 * 64 * 4
    assert sess.memory.bytes_peak <= alloc * (budget + 8) / budget


def test_streaming_llm_keeps_sinks_and_recent(tiny, docs):
    model, tok, d = tiny
    s, _ = tasks.document_stream(prompter(tiny), docs[192][0], k=3)
    for positions in ("cache", "original"):
        m = method_from_config("streaming_llm", {"n_sink": 4, "positions": positions})
        sess = Session(model, m, 20, chunk_size=5)
        sess.feed(s.ids, s.pos, s.role)
        n = len(s.ids)
        for st in sess.stores:
            for h in range(st.h):
                kept = sorted(st.seq[h][st.valid[h]].tolist())
                assert kept == [0, 1, 2, 3] + list(range(n - 16, n))


def test_h2o_kept_set_equals_bruteforce():
    """Drive one store through the attention function with random q/k/v and compare H2O's kept
    set with a float64 brute force of the rule: accumulated attention, recent window, top-k."""
    from types import SimpleNamespace

    from kvbench.engine import hf
    from kvbench.engine.store import KVStore

    torch.manual_seed(0)
    hkv, g, dd, budget, steps = 2, 2, 16, 12, 40
    m = method_from_config("h2o", {"recent_ratio": 0.25})
    store = KVStore(hkv, dd, torch.float32, torch.device("cpu"), track_scores=True)
    cache = hf.StoreCache([store])
    module = SimpleNamespace(layer_idx=0, scaling=dd**-0.5)
    ref = [dict(keys={}, score={}) for _ in range(hkv)]  # per head: seq -> key/value, seq -> score
    chunks = [6, 5] + [1] * steps
    seq0 = 0
    for n in chunks:
        q = torch.randn(1, hkv * g, n, dd)
        kk, vv = torch.randn(1, hkv, n, dd), torch.randn(1, hkv, n, dd)
        seq = torch.arange(seq0, seq0 + n)
        cache.pending = (seq, seq, torch.ones(n, dtype=torch.long))
        K, V = cache.layers[0].update(kk, vv)
        hf.kvbench_attention(module, q, K, V, None, kvbench_cache=cache)
        for h in range(hkv):
            r = ref[h]
            for i in range(n):
                r["keys"][seq0 + i] = kk[0, h, i].double()
                r["score"][seq0 + i] = 0.0
            ks = sorted(r["keys"])
            km = torch.stack([r["keys"][s] for s in ks])
            for gi in range(g):
                for i in range(n):
                    vis = [j for j, s in enumerate(ks) if s <= seq0 + i]
                    logit = q[0, h * g + gi, i].double() @ km[vis].T * dd**-0.5
                    p = torch.softmax(logit, -1)
                    for j, pj in zip(vis, p):
                        r["score"][ks[j]] += float(pj)
        seq0 += n
        budgets = torch.full((hkv,), budget)
        if bool((store.live() > budget).any()):
            from kvbench.methods.base import LayerView

            store.compact(m.select(LayerView(store.seq, store.pos, store.role, store.valid, store.score), budgets))
        for h in range(hkv):
            r = ref[h]
            ks = sorted(r["keys"])
            if len(ks) > budget:
                n_recent = int(budget * 0.25)
                recent = ks[-n_recent:]
                rest = sorted(ks[:-n_recent], key=lambda s: (-r["score"][s], s))[: budget - n_recent]
                keep = set(recent) | set(rest)
                r["keys"] = {s: r["keys"][s] for s in keep}
                r["score"] = {s: r["score"][s] for s in keep}
            assert sorted(store.seq[h][store.valid[h]].tolist()) == sorted(r["keys"]), f"head {h} after seq {seq0}"


def test_gpe_streaming_source_kv_equals_prefill(tiny, docs):
    """With no eviction, the source KV after streaming reads equals prefilling the source group."""
    model, tok, d = tiny
    p = prompter(tiny)
    doc = docs[96][0]
    sess = Session(model, method_from_config("full", {}), None, chunk_size=4)
    tasks.translate(sess, p, doc, k=3)
    src_words = p.words(doc["source"])
    instr = p.instruction()
    ids = instr + [t for w in src_words for t in w]
    ref = Session(model, method_from_config("full", {}), None, chunk_size=1000)
    ref.feed(ids, list(range(len(ids))), [streams.ROLE_INSTR] * len(instr) + [streams.ROLE_SOURCE] * (len(ids) - len(instr)))
    for a, b in zip(sess.stores, ref.stores):
        src = a.role[0] != streams.ROLE_TARGET
        assert (a.k[:, src] - b.k).abs().max() < 1e-5
        assert (a.v[:, src] - b.v).abs().max() < 1e-5


def test_streaming_with_large_k_equals_batch(tiny, docs):
    model, tok, d = tiny
    p = prompter(tiny)
    doc = docs[96][1]
    a = tasks.translate(Session(model, method_from_config("full", {}), None, 16), p, doc, k=10**6)
    b = tasks.run_task("translate_batch", Session(model, method_from_config("full", {}), None, 16), p, doc, {})
    assert a["hypothesis"] == b["hypothesis"]


@pytest.mark.parametrize("target", [False, True])
def test_decode_mask_shortcut_equals_store_mask(target):
    """One query that is the newest token (a decode step): attention's shortcut (live slots, less the
    target keys for a non-target query) equals Store.mask, on a store whose slots were reused in place
    out of stream order, with target and non-target keys; a pending tuple the session did not make
    takes the general path."""
    from types import SimpleNamespace

    from kvbench.engine import hf
    from kvbench.engine.store import KVStore

    g = torch.Generator().manual_seed(3)
    st = KVStore(3, 4, torch.float32, "cpu", inplace=True)
    seq = 0
    for n in (7, 1, 1, 3, 1):
        roles = (torch.rand(n, generator=g) > 0.5).long() * streams.ROLE_TARGET
        s = torch.arange(seq, seq + n)
        st.append(torch.randn(3, n, 4, generator=g), torch.randn(3, n, 4, generator=g), s, s, roles)
        seq += n
        keep = torch.rand(st.valid.shape, generator=g) > 0.3
        st.compact(keep | (st.seq == seq - 1))
    q = torch.tensor([seq])  # the newest token, written into a freed slot
    role = torch.tensor([streams.ROLE_TARGET if target else streams.ROLE_SOURCE])
    st.append(torch.randn(3, 1, 4, generator=g), torch.randn(3, 1, 4, generator=g), q, q, role)
    assert not st.ordered and bool((st.role[st.valid] == streams.ROLE_TARGET).any())
    assert bool((st.role[st.valid] != streams.ROLE_TARGET).any())
    want = st.mask(q, role == streams.ROLE_TARGET, streams.ROLE_TARGET)
    pending = (q, q, role)
    cache = SimpleNamespace(pending=pending, pending_target=(pending, [target]))
    got = hf._visible(st, cache, q, role, 0)
    assert got.shape == want.shape and torch.equal(got, want)
    assert not torch.equal(want, st.valid[:, None, :]) or target  # the role term matters here
    cache.pending = (q, q, role)  # set by someone else: no host-side roles, the general mask
    calls = []
    orig = st.mask
    st.mask = lambda *a: calls.append(1) or orig(*a)
    assert torch.equal(hf._visible(st, cache, q, role, 0), want) and calls
