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
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvbench import layout, tasks
from kvbench.engine import hf
from kvbench.engine.session import Session
from kvbench.methods import method_from_config
from kvbench.prompt import Prompter

PROBE = "kvbench_probe"


class Probe:
    """Records, per forward and layer, the q / k the attention function consumes (and the store's
    slot metadata), plus the pre-RoPE q / k of every fed token from q_proj / k_proj hooks."""

    def __init__(self, model, session: Session):
        self.model, self.session, self.calls, self.pre = model, session, [], {}
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
                store[s] = x[i]
        return hook

    def attention(self, module, query, key, value, attention_mask, **kw):
        cache = kw["kvbench_cache"]
        st = cache.layers[module.layer_idx].store
        seq = cache.pending[0]
        self.calls.append(dict(layer=module.layer_idx, q=query[0].detach().float().clone(),
                               k=key[0].detach().float().clone(), kseq=st.seq.clone(), kvalid=st.valid.clone(),
                               qseq=seq.clone()))
        return hf.kvbench_attention(module, query, key, value, attention_mask, **kw)

    def __enter__(self):
        AttentionInterface.register(PROBE, self.attention)
        AttentionMaskInterface.register(PROBE, hf._no_mask)
        self.model.set_attn_implementation(PROBE)
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.model.set_attn_implementation(hf.ATTN_NAME)


def intended_positions(mode: str, seqs: list[int], s: layout.Stream, base: dict) -> list[int]:
    """Intended RoPE position of each entry in `seqs` (the cached entries plus the new tokens of one
    forward, stream order) under `mode`."""
    if mode == "original":
        return [s.pos[j] for j in seqs]
    out, count = [], {False: 0, True: 0}
    for j in sorted(seqs):
        g = s.role[j] == layout.ROLE_TARGET
        out.append((j, base[g] + count[g]))
        count[g] += 1
    d = dict(out)
    return [d[j] for j in seqs]


def rope_ref(model, x_pre: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """transformers' rotary embedding of pre-RoPE vectors x_pre (n, H, D) at positions (n,)."""
    pos = torch.tensor(positions)[None]
    cos, sin = model.model.rotary_emb(x_pre[None], pos)  # (1, n, D)
    x = x_pre.transpose(0, 1)[None]  # (1, H, n, D)
    r, _ = apply_rotary_pos_emb(x, x, cos.float(), sin.float())
    return r[0]  # (H, n, D)


def check_calls(model, probe: Probe, mode: str, s: layout.Stream, tol: float) -> int:
    """Compare every recorded attention call with the reference; returns the number of evicting
    forwards seen (a test that never evicts proves nothing)."""
    base = {False: s.pos[0], True: next((p for p, r in zip(s.pos, s.role) if r == layout.ROLE_TARGET), 0)}
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
            want = intended_positions(mode, kseq, s, base)
            k_pre = torch.stack([probe.pre[(li, "k")][j][h] for j in kseq])[:, None]  # (C, 1, D)
            ref = rope_ref(model, k_pre, want)[0]  # (C, D)
            got = call["k"][h][valid]
            err = float((got - ref).abs().max() / ref.abs().max())
            assert err < tol, f"{mode}: layer {li} head {h}, keys at query seq {qseq}: rel. error {err:.2e}"
        live = sorted(set(call["kseq"][0][call["kvalid"][0]].tolist()))
        qwant = intended_positions(mode, live, s, base)
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


@pytest.mark.parametrize("mode", ["cache", "original"])
@pytest.mark.parametrize("chunk", [1, 5])
@pytest.mark.parametrize("n_sink", [4, 0])
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
    evicting = check_calls(model, probe, mode, s, tol=1e-4)
    assert evicting > len(s.ids) // chunk - 30  # almost every forward ran on an evicted cache


def test_positions_token_by_token_translation(tiny, docs):
    """The translation task's own feeding (instruction + k words, READ words, WRITE tokens) with
    `cache` positions: queries and keys at their intended positions at every step."""
    model, tok, d = tiny
    p = Prompter(tok, d, "syn_src", "syn_tgt")
    sess = Session(model, method_from_config("streaming_llm", {"n_sink": 4, "positions": "cache"}), 20, chunk_size=8)
    fed = layout.Stream([], [], [], [])
    real_feed = sess.feed

    def recording_feed(ids, pos, role, logits="last"):
        fed.ids.extend(list(ids)), fed.pos.extend(list(pos)), fed.role.extend(list(role))
        return real_feed(ids, pos, role, logits)

    sess.feed = recording_feed
    with Probe(model, sess) as probe:
        tasks.translate(sess, p, docs[96][0], k=3)
    assert len(fed.ids) > 40
    assert check_calls(model, probe, "cache", fed, tol=1e-4) > 10
