"""Quantized attention block by block, and the quantized byte goals (issue #20).

Attention over a QuantKVStore dequantizes one block of one head at a time (`QuantKVStore.blocks`)
and combines the blocks with an online softmax (`hf._attend_blocks`). These tests hold it to:
- the same output and the same attention scores (H2O) as one softmax over the whole dequantized
  cache, at every block size, on a store with every tier (hi, body with partial key groups,
  residual) and heads of different lengths;
- a working set bounded by the block (`transient_bytes_peak`), not by the cache;
- at the session level, the same perplexity with blocks of 5 tokens as with one block;
- the byte goals with scales and zeros counted: 4-bit <= 0.28x and 2-bit <= 0.16x of fp16 at the
  paper config's group size (128; value rows then form one group when head_dim <= 128).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvbench import tasks
from kvbench.engine import hf
from kvbench.engine.qstore import QuantKVStore, SinkOutlierFlags, value_group
from kvbench.engine.session import Session
from kvbench.methods import method_from_config
from kvbench.prompt import Prompter
from kvbench.streams import ROLE_TARGET

D = 16
MODULE = SimpleNamespace(layer_idx=0, config=SimpleNamespace(sliding_window=None))  # no window, no soft-cap


def ragged_store(track_scores=True) -> QuantKVStore:
    """2 KV heads at different bits, sinks in the hi tier, 8 evictions that leave partial key groups
    and heads of different lengths, then one new token (the query's own)."""
    st = QuantKVStore(2, D, torch.float32, "cpu", [4, 2], [4, 8], group_size=4, residual=3,
                      track_scores=track_scores, hi_bits=(8, 8), max_hi=2,
                      flagger=SinkOutlierFlags(2, 0.9, 3.0, False))
    g = torch.Generator().manual_seed(0)
    s0 = 0
    for n in (9, 7, 1, 12, 5):
        k, v = torch.randn(2, n, D, generator=g), torch.randn(2, n, D, generator=g)
        seq = torch.arange(s0, s0 + n)
        st.append(k, v, seq, seq, (seq % 3 == 0).long() * ROLE_TARGET)
        s0 += n
    keep = torch.rand(st.valid.shape, generator=g) > 0.3
    keep[1, ::2] = False  # head 1 loses more: ragged heads
    keep[:, :2] = True  # the hi tier (slots first) keeps its sinks
    st.compact(keep)
    k, v = torch.randn(2, 1, D, generator=g), torch.randn(2, 1, D, generator=g)
    st.append(k, v, torch.tensor([s0]), torch.tensor([s0]), torch.tensor([ROLE_TARGET]))
    c = st.counts()
    assert c[0]["res"] != c[1]["res"] or st.n_live[0] != st.n_live[1]
    assert all(x["hi"] > 0 and x["body"] > 0 and x["res"] > 0 for x in c)
    assert any(0 < gs < 4 for x in c for gs in x["groups"])  # a partial key group
    return st


def reference(st, query, seq, role, scaling):
    """One softmax in float64 over the whole dequantized cache (keys_values)."""
    k, v = st.keys_values()
    mask = st.mask(seq, role == ROLE_TARGET, ROLE_TARGET)  # (Hkv, n, C)
    hq, n = query.shape[1], query.shape[2]
    g = hq // st.h
    q = query[0].reshape(st.h, g, n, D).double()
    s = torch.einsum("hgnd,hcd->hgnc", q, k.double()) * scaling
    p = torch.softmax(s.masked_fill(~mask[:, None], float("-inf")), dim=-1)
    out = torch.einsum("hgnc,hcd->hgnd", p, v.double()).reshape(hq, n, D).transpose(0, 1)
    return out, p.sum(dim=1)


@pytest.mark.parametrize("block", [1, 3, 7, 10_000])
def test_blocks_equal_one_softmax(block):
    st = ragged_store()
    seq, role = torch.tensor([int(st.seq.max())]), torch.tensor([ROLE_TARGET])
    query = torch.randn(1, 6, 1, D, generator=torch.Generator().manual_seed(1))  # 3 query heads per KV head
    cache = hf.StoreCache([st])
    cache.block = block
    st.score.zero_()
    got = hf._attend_blocks(MODULE, query, st, cache, seq, role, 0.25)
    want, p = reference(st, query, seq, role, 0.25)
    assert torch.allclose(got[0].double(), want, atol=1e-5), (got[0] - want).abs().max()
    assert torch.allclose(st.score.double(), p.sum(dim=1), atol=1e-5)  # H2O's accumulated attention
    assert float(st.score[~st.valid].abs().sum()) == 0.0


def test_working_set_is_one_block():
    st = ragged_store(track_scores=False)
    seq, role = torch.tensor([int(st.seq.max())]), torch.tensor([ROLE_TARGET])
    query = torch.randn(1, 2, 1, D)
    peaks = {}
    for block in (4, 10_000):
        cache = hf.StoreCache([st])
        cache.block = block
        hf._attend_blocks(MODULE, query, st, cache, seq, role, 0.25)
        peaks[block] = cache.transient_peak
    one_block = 4 * D * 2 * 4  # 4 tokens of K and V in fp32
    assert 0 < peaks[4] <= one_block
    whole_head = max(st.n_live) * D * 2 * 4
    assert peaks[10_000] > one_block and peaks[10_000] <= whole_head


def test_session_blocks_of_five_equal_one_block(tiny, docs):
    """A quantized method through the model, ppl stepwise at a tight budget: blocks of 5 tokens give
    the same scores as one block, and report a 5-token working set."""
    model, tok, d = tiny
    doc, p = docs[96][0], Prompter(tok, d, "syn_src", "syn_tgt")
    m = method_from_config("stream_quant", {"group_size": 16, "residual": 4, "key_bits_normal": 2,
                                           "evict": "h2o"})
    rows, peaks = {}, {}
    for block in (5, 100_000):
        sess = Session(model, m, 24, 8)
        sess.cache.block = block
        rows[block] = tasks.run_task("ppl", sess, p, doc, {"wait_k": 3})
        peaks[block] = sess.cache.transient_peak
    a, b = rows[5]["nll_sum"], rows[100_000]["nll_sum"]
    assert abs(a - b) <= 1e-5 * abs(b)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    assert 0 < peaks[5] <= 5 * head_dim * 2 * 4 < peaks[100_000]
    full = Session(model, method_from_config("full", {}), None, 8)
    tasks.run_task("ppl", full, p, doc, {"wait_k": 3})
    assert full.cache.transient_peak == 0  # fp32 dense cache: attention reads the store's own tensors


@pytest.mark.parametrize("head_dim", [64, 128])
def test_byte_goals_at_group_128(head_dim):
    """Body bytes (codes + fp16 scales and zeros) / fp16 of the same tokens, from the tensors."""
    assert value_group(128, head_dim) == head_dim
    for bits, goal in ((4, 0.28), (2, 0.16)):
        st = QuantKVStore(2, head_dim, torch.float16, "cpu", [bits] * 2, [bits] * 2, 128, 32)
        for a in range(0, 1024, 64):
            seq = torch.arange(a, a + 64)
            st.append(torch.randn(2, 64, head_dim).half(), torch.randn(2, 64, head_dim).half(), seq, seq,
                      torch.zeros(64, dtype=torch.long))
        n_body = sum(c["body"] for c in st.counts())
        ratio = st.tier_bytes()["body"] / (n_body * head_dim * 2 * 2)
        # keys: bits/16 + one (scale, zero) per channel per 128 tokens; values: one per row
        assert ratio == pytest.approx(bits / 16 + 1 / 128 + 1 / head_dim)
        assert ratio <= goal


def test_group_above_head_dim_accepted_below_must_divide(tiny):
    model = tiny[0]
    Session(model, method_from_config("stream_quant", {"group_size": 128}), 64, 8)  # head_dim 64
    with pytest.raises(ValueError, match="group_size 48 does not divide head_dim"):
        Session(model, method_from_config("stream_quant", {"group_size": 48}), 64, 8)
