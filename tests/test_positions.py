"""RoPE positions after eviction, checked against transformers' own rotary embedding.

At every forward of an evicting stream, the queries and keys the attention actually uses are compared
with `apply_rotary_pos_emb(q_pre, k_pre, *model.model.rotary_emb(x, intended_positions))`, where
q_pre / k_pre are the model's own q_proj / k_proj outputs on the same hidden states (forward hooks on
the session's run), and the intended position of an entry is computed here, independently of the
engine, from the stream's original positions and the set of entries the cache holds at that forward:
- `original`: the position the token was read at;
- `cache`: its rank among the cached entries of its GPE group, counted from the group's first
  position (StreamingLLM's re-indexing, applied per group).
A key re-rotated in the wrong direction, or a new token placed one position off after an eviction,
misses the reference by O(|k|) and fails the test.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvbench import streams, tasks
from kvbench.engine.session import Session
from kvbench.methods import method_from_config
from kvbench.prompt import Prompter

class Probe:
    """The q / k the attention function consumes, per forward and layer, with the store's slot
    metadata (the engine's `StoreCache.trace`), and the pre-RoPE q / k of every fed token from
    forward hooks on q_proj / k_proj."""

    def __init__(self, model, session: Session, keep=lambda seq: True):
        self.model, self.session, self.calls, self.pre, self.keep = model, session, [], {}, keep
        self.hooks = []
        for i, layer in enumerate(model.model.layers):
            att = layer.self_attn
            self.hooks.append(att.q_proj.register_forward_hook(self._proj_hook(i, "q", att)))
            self.hooks.append(att.k_proj.register_forward_hook(self._proj_hook(i, "k", att)))

    def _proj_hook(self, layer, kind, att):
        def hook(mod, inp, out):
            seq = self.session.cache.pending[0]
            d = att.head_dim
            x = out[0].reshape(out.shape[1], -1, d).detach().float()  # (n, H, D)
            store = self.pre.setdefault((layer, kind), {})
            for i, s in enumerate(seq.tolist()):
                if self.keep(s):
                    store[s] = x[i]
        return hook

    def __enter__(self):
        self.session.cache.trace = self.calls  # what the attention function consumed, per layer
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.session.cache.trace = None


def intended_positions(mode: str, seqs: list[int], s: streams.Stream, base: dict, n_sink: int = 0,
                       max_lead: int = 10**9) -> list[int]:
    """Intended RoPE position of each entry in `seqs` (the cached entries plus the new tokens of one
    forward, stream order) under `mode`."""
    if mode == "original":
        return [s.pos[j] for j in seqs]
    if mode == "shifted":
        return shifted_positions(seqs, s, n_sink, max_lead)
    out, count = [], {False: 0, True: 0}
    for j in sorted(seqs):
        g = s.role[j] == streams.ROLE_TARGET
        out.append((j, base[g] + count[g]))
        count[g] += 1
    d = dict(out)
    return [d[j] for j in seqs]


def shifted_positions(seqs: list[int], s: streams.Stream, n_sink: int, max_lead: int) -> list[int]:
    """The GPE-consistent re-indexing, from its definition: sinks (the first n_sink tokens of the
    stream) keep their positions; a group's advance is how far its oldest cached non-sink is past
    the group's first non-sink position; every non-sink moves down by the smallest advance s, and a
    group whose advance exceeds s + max_lead by the excess too."""
    tgt = [r == streams.ROLE_TARGET for r in s.role]
    first = {}
    for j in range(len(s.ids)):
        if j >= n_sink:
            first.setdefault(tgt[j], s.pos[j])
    adv = {}
    for j in seqs:
        if j >= n_sink:
            adv[tgt[j]] = min(adv.get(tgt[j], 10**18), s.pos[j] - first[tgt[j]])
    shift = max(min(adv.values()), 0) if adv else 0
    extra = {g: max(a - shift - max_lead, 0) for g, a in adv.items()}
    return [s.pos[j] if j < n_sink else s.pos[j] - shift - extra[tgt[j]] for j in seqs]


def rope_ref(model, x_pre: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """transformers' rotary embedding of pre-RoPE vectors x_pre (n, H, D) at positions (n,)."""
    pos = torch.tensor(positions)[None]
    cos, sin = model.model.rotary_emb(x_pre[None], pos)  # (1, n, D)
    x = x_pre.transpose(0, 1)[None]  # (1, H, n, D)
    r, _ = apply_rotary_pos_emb(x, x, cos.float(), sin.float())
    return r[0]  # (H, n, D)


def check_calls(model, probe: Probe, mode: str, s: streams.Stream, tol: float, n_sink: int = 0,
                max_lead: int = 10**9) -> int:
    """Compare every recorded attention call with the reference; returns the number of evicting
    forwards seen (a test that never evicts proves nothing)."""
    base = {False: s.pos[0], True: next((p for p, r in zip(s.pos, s.role) if r == streams.ROLE_TARGET), 0)}
    evicted, last_max = 0, -1
    for call in probe.calls:
        li = call["layer"]
        qseq = call["qseq"].tolist()
        h_kv = call["k"].shape[0]
        for h in range(h_kv):
            valid = call["kvalid"][h]
            kseq = call["kseq"][h][valid].tolist()
            if li == 0 and h == 0:
                evicted += len(kseq) < max(kseq) + 1
            want = intended_positions(mode, kseq, s, base, n_sink, max_lead)
            k_pre = torch.stack([probe.pre[(li, "k")][j][h] for j in kseq])[:, None]  # (C, 1, D)
            ref = rope_ref(model, k_pre, want)[0]  # (C, D)
            got = call["k"][h][valid]
            err = float((got - ref).abs().max() / ref.abs().max())
            assert err < tol, f"{mode}: layer {li} head {h}, keys at query seq {qseq}: rel. error {err:.2e}"
        live = sorted(set(call["kseq"][0][call["kvalid"][0]].tolist()))
        qwant = intended_positions(mode, live, s, base, n_sink, max_lead)
        qpos = [qwant[live.index(j)] for j in qseq]
        q_pre = torch.stack([probe.pre[(li, "q")][j] for j in qseq])  # (n, Hq, D)
        ref = rope_ref(model, q_pre, qpos)  # (Hq, n, D)
        err = float((call["q"] - ref).abs().max() / ref.abs().max())
        assert err < tol, f"{mode}: layer {li}, queries {qseq} at {qpos}: rel. error {err:.2e}"
        last_max = max(last_max, max(qseq))
    assert last_max == len(s.ids) - 1
    return evicted


def teacher_stream(tiny, docs, k=3):
    model, tok, d = tiny
    p = Prompter(tok, d, "syn_src", "syn_tgt")
    s, _ = tasks.document_stream(p, docs[192][0], k=k)
    return s


@pytest.mark.parametrize("mode", ["shifted", "cache", "original"])
@pytest.mark.parametrize("chunk,n_sink", [(1, 4), (1, 0), (5, 4)])
def test_positions_at_every_step(tiny, docs, mode, chunk, n_sink):
    """A GPE stream (instruction, source and target interleaved by wait-3) under a budget of 24: at
    every forward, every query and every cached key matches transformers' RoPE at its intended
    position."""
    model = tiny[0]
    s = teacher_stream(tiny, docs)
    sess = Session(model, method_from_config("streaming_llm", {"n_sink": n_sink, "positions": mode}), 24,
                   chunk_size=chunk)
    with Probe(model, sess) as probe:
        sess.feed(s.ids, s.pos, s.role)
    evicting = check_calls(model, probe, mode, s, tol=1e-4, n_sink=n_sink, max_lead=24)
    assert evicting > len(s.ids) // chunk - 30  # almost every forward ran on an evicted cache


@pytest.mark.parametrize("mode", ["shifted", "cache"])
def test_positions_token_by_token_translation(tiny, docs, mode):
    """The translation task's own feeding (instruction + k words, READ words, WRITE tokens), default
    (`shifted`) and `cache` positions: queries and keys at their intended positions at every step."""
    model, tok, d = tiny
    p = Prompter(tok, d, "syn_src", "syn_tgt")
    sess = Session(model, method_from_config("streaming_llm", {"n_sink": 4, "positions": mode}), 20, chunk_size=8)
    fed = streams.Stream([], [], [], [])
    real_feed = sess.feed

    def recording_feed(ids, pos, role, logits="last"):
        fed.ids.extend(list(ids)), fed.pos.extend(list(pos)), fed.role.extend(list(role))
        return real_feed(ids, pos, role, logits)

    sess.feed = recording_feed
    with Probe(model, sess) as probe:
        tasks.translate(sess, p, docs[96][0], k=3)
    assert len(fed.ids) > 40
    assert check_calls(model, probe, mode, fed, tol=1e-4, n_sink=4, max_lead=20) > 10


def one_layer_bf16():
    """The builtin architecture cut to one layer, random weights, bfloat16 (fast and drift-prone)."""
    from transformers import LlamaForCausalLM

    from kvbench import builtin

    tok = builtin.build_tokenizer()
    cfg = builtin.build_config(len(tok), tok, 8192)
    cfg.num_hidden_layers = 1
    torch.manual_seed(1)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def test_no_drift_after_5000_evictions_bf16(mode="shifted"):
    """bf16, B = 256, 5,000 evictions (a key in the window is re-indexed ~250 times): the keys and the
    query attention uses match transformers' own bf16 RoPE of the same pre-RoPE vectors at the
    intended positions (ranks: one position group) within the error of one bf16 rotation. (On one
    position group `shifted` and `cache` give the same positions.)"""
    model = one_layer_bf16()
    budget, n_evict, n_sink = 256, 5000, 4
    n = budget + n_evict
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (n,), generator=g).tolist()
    s = streams.Stream(ids, list(range(n)), [streams.ROLE_SOURCE] * n, [])
    sess = Session(model, method_from_config("streaming_llm", {"n_sink": n_sink, "positions": mode}), budget,
                   chunk_size=64)
    # pre-RoPE hooks from the start (for the entries still cached at the end); the trace: last step
    probe = Probe(model, sess, keep=lambda j: j < n_sink or j >= n - budget)
    sess.feed(ids[:budget], s.pos[:budget], s.role[:budget])
    for i in range(budget, n - 1):  # one token per forward: one eviction each
        sess.feed(ids[i:i + 1], s.pos[i:i + 1], s.role[i:i + 1])
    with probe:
        sess.feed(ids[n - 1:], s.pos[n - 1:], s.role[n - 1:])
    (call,) = probe.calls
    valid = call["kvalid"][0]
    order = torch.argsort(call["kseq"][0][valid])  # slots are reused in place: rank entries by stream index
    kseq = call["kseq"][0][valid][order].tolist()
    assert len(kseq) == budget + 1 and kseq[:n_sink] == list(range(n_sink)) and kseq[-1] == n - 1
    want = list(range(budget + 1))  # sinks 0..3, the window 4..255, the new token at 256
    for h in range(call["k"].shape[0]):
        pre = torch.stack([probe.pre[(0, "k")][j][h] for j in kseq])[:, None].to(torch.bfloat16)  # (C, 1, D)
        ref16 = rope_ref_dtype(model, pre, want)[0].float()  # transformers, in bf16 as the model runs it
        ref32 = rope_ref(model, pre.float(), want)[0]  # the exact rotation of the same vector
        one = ((ref16 - ref32).norm(dim=-1) / ref32.norm(dim=-1)).max()  # error of one bf16 rotation
        err = (call["k"][h][valid][order] - ref16).norm(dim=-1) / ref16.norm(dim=-1)  # (C,)
        assert float(err.max()) <= 2 * float(one) + 2**-9, (h, float(err.max()), float(one))
    q_pre = torch.stack([probe.pre[(0, "q")][n - 1]]).to(torch.bfloat16)  # (1, Hq, D)
    qerr = (call["q"] - rope_ref_dtype(model, q_pre, [budget]).float()).norm(dim=-1) / call["q"].norm(dim=-1)
    assert float(qerr.max()) < 2**-6


def rope_ref_dtype(model, x_pre: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """As rope_ref, in x_pre's dtype (transformers casts cos/sin to it, as in the model's forward)."""
    pos = torch.tensor(positions)[None]
    cos, sin = model.model.rotary_emb(x_pre[None], pos)
    x = x_pre.transpose(0, 1)[None]
    r, _ = apply_rotary_pos_emb(x, x, cos, sin)
    return r[0]


# ---- the GPE-consistent mode (`shifted`, the default) ------------------------------------------------
def test_default_is_gpe_consistent():
    m = method_from_config("streaming_llm", {})
    assert m.positions == "shifted" and m.position_rule.mode == "shifted"
    assert method_from_config("streaming_llm", {"positions": "original"}).position_rule is None


def test_shifted_without_sinks_equals_original_logits(tiny, docs):
    """No sinks: `shifted` only moves every entry by one shared amount, so at every step of an
    evicting GPE stream (teacher-forced wait-3, budget 24) the logits equal `original`'s."""
    model = tiny[0]
    s = teacher_stream(tiny, docs)
    a = Session(model, method_from_config("streaming_llm", {"n_sink": 0, "positions": "shifted"}), 24, chunk_size=1)
    b = Session(model, method_from_config("streaming_llm", {"n_sink": 0, "positions": "original"}), 24, chunk_size=1)
    la = a.feed(s.ids, s.pos, s.role, logits="all")
    lb = b.feed(s.ids, s.pos, s.role, logits="all")
    assert a.max_position < 24 + 24 < b.max_position  # bounded vs the stream's own positions
    assert float((la - lb).abs().max()) < 1e-4


def oracle_stream(tiny, docs):
    """The oracle layout (whole source, then the target from position 0): one group runs far ahead."""
    model, tok, d = tiny
    p = Prompter(tok, d, "syn_src", "syn_tgt")
    return tasks.document_stream(p, docs[192][0], k=streams.WAIT_INF)[0]


@pytest.mark.parametrize("layout_name,budget,max_lead", [("wait3", 16, None), ("wait3", 40, None),
                                                        ("oracle", 24, None), ("oracle", 24, 8)])
def test_shifted_positions_bounded_sinks_fixed_offsets_kept(tiny, docs, layout_name, budget, max_lead):
    """At every forward: positions in [0, B + W] (W = max_lead, default the budget; target_offset 0);
    the sinks at their original positions; every non-sink entry moved by one shared shift (so every
    offset between non-sinks, within and across groups, is the one without eviction) unless one
    group's advance runs more than W ahead of the other's (the oracle layout), where only the
    leading group is shifted further."""
    model = tiny[0]
    s = teacher_stream(tiny, docs) if layout_name == "wait3" else oracle_stream(tiny, docs)
    params = {"n_sink": 4, "positions": "shifted"} | ({"max_lead": max_lead} if max_lead is not None else {})
    sess = Session(model, method_from_config("streaming_llm", params), budget, chunk_size=8)
    sess.cache.trace = []
    sess.feed(s.ids, s.pos, s.role)
    w = budget if max_lead is None else max_lead
    orig, tgt = torch.tensor(s.pos), torch.tensor(s.role) == streams.ROLE_TARGET
    capped = 0
    for call in sess.cache.trace:
        for h in range(call["kpos"].shape[0]):
            v = call["kvalid"][h]
            seq, p = call["kseq"][h][v], call["kpos"][h][v]
            assert int(p.min()) >= 0 and int(p.max()) <= budget + w == sess.rule.bound(budget), (int(p.max()), budget + w)
            sink = seq < 4
            assert torch.equal(p[sink], orig[seq[sink]])
            shift = orig[seq[~sink]] - p[~sink]
            for g in (False, True):  # one shift per group ...
                sg = shift[tgt[seq[~sink]] == g]
                assert sg.numel() == 0 or bool((sg == sg[0]).all())
            if shift.unique().numel() > 1:  # ... and one shared by both groups unless capped
                capped += 1
                assert layout_name == "oracle"
    assert (capped > 0) == (layout_name == "oracle" and w < 100)


@pytest.mark.parametrize("rotary", [64, 32, 48])
def test_wide_rope_tables_rotate_as_the_half_tables(rotary):
    """Attention rotates with `rope_wide` tables (x cos + swap(x) sin, four ops) what the rotate_half
    formula gives half by half (x1 cos - x2 sin, x2 cos + x1 sin, the dims past R passed through): the
    same float32 values, bit for bit, full and partial rotary, and broadcast over the query heads of a
    KV head."""
    from kvbench.engine.hf import rope_apply_wide, rope_wide

    def rope_apply(k, cos, sin):  # the reference, half by half
        h = cos.shape[-1]
        k1, k2, rest = k[..., :h], k[..., h:2 * h], k[..., 2 * h:]
        return torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin, rest], dim=-1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 64, generator=g)
    ang = torch.randn(2, 9, rotary // 2, generator=g) * 100
    cos, sin = ang.cos(), ang.sin()
    cw, sw = rope_wide(cos, sin, 64)
    assert torch.equal(rope_apply_wide(x, cw, sw, rotary // 2), rope_apply(x, cos, sin))
    q = torch.randn(2, 3, 9, 64, generator=g)  # (KV heads, query heads per KV head, n, D)
    want = rope_apply(q.reshape(6, 9, 64), cos.repeat_interleave(3, 0), sin.repeat_interleave(3, 0))
    assert torch.equal(rope_apply_wide(q, cw[:, None], sw[:, None], rotary // 2).reshape(6, 9, 64), want)
    if rotary < 64:
        assert torch.equal(rope_apply_wide(x, cw, sw, rotary // 2)[..., rotary:], x[..., rotary:])
