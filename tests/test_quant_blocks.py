"""Quantized attention block by block, and the quantized byte goals (issue #20).

Attention over a QuantKVStore dequantizes one block of one head at a time (`QuantKVStore.blocks`)
and combines the blocks with an online softmax (`hf._attend_blocks`). These tests hold it to:
- the same output and the same attention scores (H2O) as one softmax over the whole dequantized
  cache, at every block size, on a store with every tier (hi, body with partial key groups,
  residual) and heads of different lengths; both of its paths (two passes over a head's logits,
  online softmax), one query or several, 2/3/4/8/16 bits, a float16 cache (read in float32, never
  rounded to float16: the reference is the codes dequantized in float64);
- pieces that cover every slot once, each within a block and a tier, rescaled by the right groups;
- a working set bounded by the block (`transient_bytes_peak`), not by the cache;
- at the session level, the same perplexity with blocks of 5 tokens as with one block;
- the byte goals with scales and zeros counted: 4-bit <= 0.28x and 2-bit <= 0.16x of fp16 at the
  paper config's group size (128; value rows then form one group when head_dim <= 128).
"""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from kvbench import tasks
from kvbench.engine import ckernel, hf, qstore
from kvbench.engine.qstore import ChannelKeys, QuantKVStore, Rows, SinkOutlierFlags, value_group
from kvbench.engine.session import Session
from kvbench.methods import method_from_config
from kvbench.prompt import Prompter
from kvbench.quant import pack_codes, unpack_codes, unpack_float
from kvbench.streams import ROLE_TARGET

D = 16
MODULE = SimpleNamespace(layer_idx=0, config=SimpleNamespace(sliding_window=None))  # no window, no soft-cap


def ragged_store(track_scores=True, bits=((4, 2), (4, 8), (8, 8)), dtype=torch.float32, new=1) -> QuantKVStore:
    """2 KV heads at different bits (key bits, value bits, hi-tier bits), sinks in the hi tier, 8
    evictions that leave partial key groups and heads of different lengths, then `new` new tokens
    (the queries' own)."""
    st = QuantKVStore(2, D, dtype, "cpu", *bits[:2], group_size=4, residual=3,
                      track_scores=track_scores, hi_bits=bits[2], max_hi=2,
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
    k, v = torch.randn(2, new, D, generator=g), torch.randn(2, new, D, generator=g)
    seq = torch.arange(s0, s0 + new)
    st.append(k, v, seq, seq, torch.full((new,), ROLE_TARGET))
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


def use_copy(which: str):
    """Run deq.c's "avx2" or "portable" copy (skipped where it cannot run); returns how to restore."""
    if ckernel.lib() is None:
        pytest.skip(ckernel.status())
    before = ckernel.simd()
    if which == "portable":
        assert not ckernel.simd(False), "the portable copy must run wherever the kernels are built"
    elif not ckernel.simd(True):
        pytest.skip("this CPU has no AVX2 + FMA + F16C: the portable copy only")
    return lambda: ckernel.simd(before)


@pytest.fixture(params=["avx2", "portable"])
def copy(request):
    """Both copies of the C kernels, AVX2 intrinsics and portable C."""
    restore = use_copy(request.param)
    yield request.param
    restore()


@pytest.fixture(params=["c-avx2", "c", "torch"])
def path(request, monkeypatch):
    """Every way attention reads the store: the C kernel (whole tiers from their codes, skipped where
    none is built) in its AVX2 copy ("c-avx2") or its portable one ("c"), and "torch" (float32 blocks
    by torch ops)."""
    if request.param == "torch":
        monkeypatch.setattr(ckernel, "lib", lambda: None)
        yield request.param
        return
    restore = use_copy("avx2" if request.param == "c-avx2" else "portable")
    yield request.param
    restore()


@pytest.mark.parametrize("block", [1, 3, 7, 10_000])
def test_blocks_equal_one_softmax(block, path):
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


def dequantized64(st, h):
    """Head h's keys and values (n_live, D) in float64, from the codes (the tiers' own dequantize)."""
    hd = st.heads[h]
    k = torch.cat([hd.hk.deq(torch.float64), hd.bk.deq(torch.float64), hd.rk.double()])
    v = torch.cat([hd.hv.deq(torch.float64), hd.bv.deq(torch.float64), hd.rv.double()])
    return k, v


BITS = {"kivi": ((4, 2), (4, 8), (8, 8)), "2-3-16": ((2, 3), (2, 4), (16, 16)), "8-16": ((16, 8), (2, 16), (8, 16))}


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("new", [1, 4])
@pytest.mark.parametrize("block,track", [(1, False), (3, False), (10_000, False), (3, True), (10_000, True)])
def test_pieces_equal_float64_attention(bits, dtype, new, block, track, path, monkeypatch):
    """_attend_blocks == softmax(q.K) V over the float64 dequantized codes, per head, on both paths
    (two passes, online softmax) of both readers (C kernel, torch blocks)."""
    st = ragged_store(track, BITS[bits], dtype, new)
    last = int(st.seq.max())
    seq, role = torch.arange(last - new + 1, last + 1), torch.full((new,), ROLE_TARGET)
    hq, scaling = 6, 0.25
    query = torch.randn(1, hq, new, D, generator=torch.Generator().manual_seed(2)).to(dtype)
    cache = hf.StoreCache([st])
    cache.block = block
    calls = []
    online = hf._online_softmax
    monkeypatch.setattr(hf, "_online_softmax", lambda *a: calls.append(1) or online(*a))
    if track:
        st.score.zero_()
    got = hf._attend_blocks(MODULE, query, st, cache, seq, role, scaling)[0].transpose(0, 1).double()  # (Hq, n, D)
    g = hq // st.h
    assert bool(calls) == (not track and g * new * st.seq.shape[1] > 2 * block * D)  # the path under test
    mask = st.mask(seq, role == ROLE_TARGET, ROLE_TARGET)  # (Hkv, n, C)
    for h in range(st.h):
        k, v = dequantized64(st, h)
        q = query[0, h * g:(h + 1) * g].double()  # (g, n, D)
        x = (q @ k.T * scaling).masked_fill(~mask[h, :, :k.shape[0]], float("-inf"))
        p = torch.softmax(x, dim=-1)  # (g, n, L)
        want = p @ v
        out_rounding = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps  # the output comes in q's dtype
        tol = (1e-5 + out_rounding) * max(1.0, float(want.abs().max()))
        assert torch.allclose(got[h * g:(h + 1) * g], want, atol=tol), (got[h * g:(h + 1) * g] - want).abs().max()
        if track:
            assert torch.allclose(st.score[h, :k.shape[0]].double(), p.sum(dim=(0, 1)), atol=1e-5)
    # the working set: one piece of K or V, unpacked (float32 codes and, below 8 bits, int32 codes
    # (4 bits: uint8 planes); 3 bits also the piece's chunk words, 4 bytes per 8 codes); the C
    # kernel's: one dequantized row (and a float16 store's 16-bit body is still read in blocks)
    per_row = D * 2 * 4 + (D // 8 * 4 if 3 in BITS[bits][0] + BITS[bits][1] else 0)
    blocks = min(block, max(st.n_live)) * per_row
    if path != "torch" and not calls:  # one row, and float32 copies of a half store's bounded float tiers
        c = st.counts()
        copies = 0 if dtype == torch.float32 else max((x["hi"] * (16 in BITS[bits][2]) + x["res"]) * D * 8 for x in c)
        assert 0 < cache.transient_peak <= max(D * 4 + copies, blocks if 16 in BITS[bits][0] + BITS[bits][1] else 0)
        if dtype == torch.float32:
            assert cache.transient_peak == D * 4
    else:
        assert 0 < cache.transient_peak <= blocks


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("block", [1, 3, 4, 5, 8, 10_000])
def test_pieces_cover_slots_within_blocks(block, fused, monkeypatch):
    """On both paths: the C kernel (any cut) and torch ops (body pieces cut at key-group ends)."""
    if fused and ckernel.lib() is None:
        pytest.skip(ckernel.status())
    if not fused:
        monkeypatch.setattr(ckernel, "lib", lambda: None)
    st = ragged_store(False)
    for h, hd in enumerate(st.heads):
        pieces = st.pieces(h, block)
        ends = [hd.n_hi, hd.n_hi + hd.n_body]
        assert [p[0] for p in pieces] == [0] + [p[0] + p[1] for p in pieces[:-1]]  # consecutive from slot 0
        assert sum(p[1] for p in pieces) == st.n_live[h]
        for s0, w, _, _ in pieces:
            assert 0 < w <= block
            assert not any(s0 < e < s0 + w for e in ends)  # each within one tier
        k, v = dequantized64(st, h)
        k32, v32 = (x[h] for x in st.keys_values())  # float32 store: QTensor.dequantize's own floats
        for s0, w, keys, values in pieces:
            for part, ref, same in ((keys, k, k32), (values, v, v32)):
                x, nbytes = part()
                assert x.dtype == torch.float32 and x.shape == (w, D)
                assert torch.allclose(x.double(), ref[s0:s0 + w], atol=1e-6)
                assert torch.equal(x, same[s0:s0 + w])  # codes * scale + zero, each rounded, as dequantize
                assert nbytes <= w * D * 2 * 4  # (2/4/8 bits here) float32 codes and int32 words or uint8 planes
        if block >= 4 and not fused:  # groups of G = 4 fit a block: torch's body pieces end at group ends
            group_ends = torch.cumsum(torch.tensor(st.counts()[h]["groups"]), 0).tolist()
            body = [p for p in pieces if hd.n_hi <= p[0] < hd.n_hi + hd.n_body]
            assert all(p[0] + p[1] - hd.n_hi in group_ends for p in body)


def test_c_kernel_is_built_where_a_compiler_is():
    """CI and a newcomer's machine have a C compiler: the fused kernel must then load, or every
    quantized decode silently takes the slower torch path."""
    if os.environ.get("KVBENCH_CKERNEL") == "0" or shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip(ckernel.status())
    assert ckernel.lib() is not None, ckernel.status()
    assert ckernel.status().startswith("C (")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sdt", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,g", [(16, 4), (12, 6), (6, 3), (64, 32), (64, 64), (128, 32), (128, 128)])  # the last: deq.c's constant-size loops
def test_c_kernel_equals_torch_path(bits, sdt, d, g, copy, monkeypatch):
    """deq.c's blocks are the torch path's floats, bit for bit (code * scale, then + zero, each rounded):
    per-token rows (values, hi tier) and channel keys with partial groups left by eviction, pieces
    cut at group ends and inside a group, head dims whose codes leave a partial byte or chunk; both
    copies of the kernels (AVX2 unpacks 8 codes at a time, and leaves the rest to the portable code)."""
    gen = torch.Generator().manual_seed(bits * 1000 + d)
    x = torch.randn(max(90, 10 * g), d, generator=gen) * 4 + torch.randn(1, d, generator=gen)
    x[7] = 0.0  # a constant group's row (scale 1, code 0)
    rows = Rows(d, bits, g, torch.float32, "cpu", sdt)
    rows.add(x[:60]), rows.add(x[60:])
    merged = ChannelKeys(d, bits, g, "cpu", sdt)
    merged.add(x[:8 * g]), merged.add(x[8 * g:8 * g + g - 1])  # whole groups, then a partial one
    keep = torch.ones(len(merged.q), dtype=torch.bool)
    keep[[1, 2 * g, 2 * g + 1, 5 * g + 3]] = False  # partial groups beyond MAX_PARTIAL: merged, a tail left
    merged.keep(keep, torch.arange(len(keep)))
    assert any(0 < n < g for n in merged.size.tolist())
    inner = ChannelKeys(d, bits, g, "cpu", sdt)
    inner.add(x[:6 * g])
    assert inner.drop([1] + ([2 * g, 2 * g + 1] if g > 2 else []))  # partial groups inside, sized unlike their neighbours
    assert inner.size.tolist()[:3] == [g - 1, g, g - 2 if g > 2 else g]

    def both(call):
        fast = call()
        with monkeypatch.context() as m:
            m.setattr(ckernel, "lib", lambda: None)
            slow = call()
        return fast, slow

    for block in (1, 5, g, 2 * g + 1, 1000):
        for keys in (merged, inner):
            for lo, hi, runs in keys.spans(block):
                (a, na), (b, _) = both(lambda: keys.deq32(lo, hi, runs))
                assert torch.equal(a, b), (block, lo, (a - b).abs().max())
                assert na == (hi - lo) * d * 4
            whole = keys.deq(torch.float32)  # the kernel cuts anywhere: row lo's group is found, not given
            for lo in range(0, len(keys.q), block):
                hi = min(lo + block, len(keys.q))
                a, _ = keys.deq32(lo, hi, None)
                assert torch.equal(a, whole[lo:hi]), (block, lo)
        for lo, hi, _ in rows.spans(block):
            (a, _), (b, _) = both(lambda: rows.deq32(lo, hi))
            assert torch.equal(a, b), (block, lo, (a - b).abs().max())


@pytest.mark.parametrize("sdt", [torch.float16, torch.bfloat16])
def test_c_kernel_widens_every_16_bit_scale_exactly(sdt, copy):
    """All 65,536 bit patterns as scales (8-bit code 1, zero 0), one per row (per-token rows: scalar
    widening) and 16 per row (channel keys: the AVX2 copy widens 8 at a time, F16C or a shift): the
    kernel's value is torch's widening, bit for bit (normal, subnormal, zero and its sign, inf, nan)."""
    s = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(sdt)
    want = s.float() * 1.0 + 0.0
    rows = Rows(1, 8, 1, torch.float32, "cpu", sdt)
    rows.q, rows.s, rows.z = torch.ones(65536, 1, dtype=torch.uint8), s[:, None], torch.zeros(65536, 1, dtype=sdt)
    keys = ChannelKeys(16, 8, 1, "cpu", sdt)
    keys.q, keys.s, keys.z = torch.ones(4096, 16, dtype=torch.uint8), s.view(4096, 16), torch.zeros(4096, 16, dtype=sdt)
    keys.size = torch.ones(4096, dtype=torch.int64)  # a group per row
    for got in (rows.deq32(0, 65536)[0][:, 0], keys.deq32(0, 4096, None)[0].reshape(-1)):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[~want.isnan()].view(torch.int32), want[~want.isnan()].view(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sdt", [torch.float16, torch.float32])
@pytest.mark.parametrize("d,g", [(16, 4), (12, 6), (64, 32), (64, 64), (128, 32), (128, 128)])
def test_c_attention_from_codes_within_float_rounding(bits, sdt, d, g, copy):
    """deq.c's one-call attention over a head's tiers (per-token codes, channel keys with partial
    groups, float32 rows) equals the exact products of the dequantized floats within float32
    summation error (d or n terms, u = 2^-24 each): logits written at each tier's slots and nowhere
    else, weighted values added to what acc held. Both copies (AVX2: fused multiply-adds in the sums,
    within the same bounds)."""
    gen = torch.Generator().manual_seed(bits * 100 + d)
    x = torch.randn(10 * g, d, generator=gen) * 3
    hi = Rows(d, bits, min(g, d), torch.float32, "cpu", sdt)
    hi.add(x[:7])
    keys = ChannelKeys(d, bits, g, "cpu", sdt)
    keys.add(x[:8 * g]), keys.add(x[8 * g:9 * g - 1])
    keep = torch.ones(len(keys.q), dtype=torch.bool)
    keep[[0, 3, g + 1]] = False
    keys.keep(keep, torch.arange(len(keep)))
    assert keys.drop([g + 2])  # a partial group inside, then whole ones (and the partial tail)
    assert 0 < keys.size.tolist()[1] < g
    values = Rows(d, bits, min(g, d), torch.float32, "cpu", sdt)
    values.add(x[:len(keys.q)] * 0.5)
    res = torch.randn(5, d, generator=gen)
    n_hi, n_body = len(hi), len(keys.q)
    parts = [hi.desc(0), hi.desc(0), keys.desc(n_hi), values.desc(n_hi)]
    parts += [qstore._float_desc(res, n_hi + n_body), qstore._float_desc(res * 2, n_hi + n_body)]
    tiers = ckernel.Tiers([v for p in parts for v in p[0]], [t for p in parts for t in p[1]])
    assert tiers.n == 3 and tiers.width == n_hi + n_body + res.shape[0]
    k = torch.cat([hi.deq32(0, n_hi)[0], keys.deq(torch.float32), res]).double()
    v = torch.cat([hi.deq32(0, n_hi)[0], values.deq32(0, n_body)[0], res * 2]).double()
    width, m, u = k.shape[0], 7, 2.0 ** -24
    qv = torch.randn(m, d, generator=gen)
    wide = torch.full((m, width + 3), float("nan"))
    ckernel.qk_tiers(qv, tiers, wide)
    want = qv.double() @ k.T
    assert ((wide[:, :width].double() - want).abs() <= d * u * (qv.double().abs() @ k.abs().T) + 1e-30).all()
    assert wide[:, width:].isnan().all()  # nothing written past the head's slots
    pw = torch.rand(m, width + 3, generator=gen)
    acc = torch.randn(m, d, generator=gen)
    want = acc.double() + pw[:, :width].double() @ v
    ckernel.pv_tiers(pw, tiers, acc)
    bound = (width + 1) * 2 * u * (acc.double().abs() + pw[:, :width].double() @ v.abs()) + 1e-30
    assert ((acc.double() - want).abs() <= bound).all()
    with pytest.raises(ValueError, match="contiguous rows"):
        ckernel.qk_tiers(qv, tiers, torch.empty(width, m).T)  # a transposed view: rows not contiguous
    with pytest.raises(ValueError, match=f"need {width} columns"):
        ckernel.pv_tiers(pw[:, :width - 1], tiers, acc)  # narrower than the head's slots


def test_simd_switch_runs_the_other_copy():
    """The label a row gets (`c-avx2` / `c`) names the copy that ran: the AVX2 copy's fused sums round
    differently from the portable ones in some of 4,096 logits, and switching back repeats the first."""
    restore = use_copy("avx2")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=gen)
    desc, keep, _ = qstore._float_desc(x, 0)
    tiers = ckernel.Tiers(desc + desc, keep)  # one tier of float32 rows, keys and values alike
    qv = torch.randn(8, 64, generator=gen)
    out = []
    try:
        for on in (True, False, True):
            assert ckernel.simd(on) == on and ckernel.reader() == ("c-avx2" if on else "c")
            out.append(torch.empty(8, 512))
            ckernel.qk_tiers(qv, tiers, out[-1])
    finally:
        restore()
    assert torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])
    assert torch.allclose(out[0], out[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 5, 16, 24, 64])
def test_unpack_float_equals_unpack_codes(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 1 << bits, (7, n), generator=g)
    codes[0], codes[1] = 0, (1 << bits) - 1  # extreme codes (the top one sets the int32 sign bit)
    packed = pack_codes(codes, bits)
    for rows in (packed, packed[2:5], packed.view(-1)[1:1 + 5 * packed.shape[1]].view(5, -1)):  # last: misaligned words
        got, nbytes = unpack_float(rows, bits, n)
        assert got.dtype == torch.float32 and torch.equal(got, unpack_codes(rows, bits, n).float())
        assert nbytes >= got.numel() * 4


def test_working_set_is_one_block(path):
    st = ragged_store(track_scores=False)
    seq, role = torch.tensor([int(st.seq.max())]), torch.tensor([ROLE_TARGET])
    query = torch.randn(1, 2, 1, D)
    peaks = {}
    for block in (4, 10_000):
        cache = hf.StoreCache([st])
        cache.block = block
        hf._attend_blocks(MODULE, query, st, cache, seq, role, 0.25)
        peaks[block] = cache.transient_peak
    if path != "torch":  # codes read one dequantized row at a time, whatever the block; float32 residual: views
        assert peaks == {4: D * 4, 10_000: D * 4}
        return
    one_block = 4 * D * 2 * 4  # 4 tokens of K and V in fp32
    assert 0 < peaks[4] <= one_block
    whole_head = max(st.n_live) * D * 2 * 4
    assert peaks[10_000] > one_block and peaks[10_000] <= whole_head


def test_session_blocks_of_five_equal_one_block(tiny, docs, monkeypatch):
    """A quantized method through the model, ppl stepwise at a tight budget: blocks of 5 tokens give
    the same scores as one block, and report a 5-token working set (torch path); the C kernel, which
    reads the codes without blocks, gives the same scores with one dequantized row as working set."""
    model, tok, d = tiny
    doc, p = docs[96][0], Prompter(tok, d, "syn_src", "syn_tgt")
    m = method_from_config("stream_quant", {"group_size": 16, "residual": 4, "key_bits_normal": 2,
                                           "evict": "h2o"})
    rows, peaks = {}, {}
    with_c = ckernel.lib() is not None
    for path in ("c", "torch") if with_c else ("torch",):
        with monkeypatch.context() as mp:
            if path == "torch":
                mp.setattr(ckernel, "lib", lambda: None)
            for block in (5, 100_000):
                sess = Session(model, m, 24, 8)
                sess.cache.block = block
                rows[path, block] = tasks.run_task("ppl", sess, p, doc, {"wait_k": 3})["nll_sum"]
                peaks[path, block] = sess.cache.transient_peak
    b = rows["torch", 100_000]
    assert all(abs(a - b) <= 1e-5 * abs(b) for a in rows.values()), rows
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    assert 0 < peaks["torch", 5] <= 5 * head_dim * 2 * 4 < peaks["torch", 100_000]
    if with_c:
        assert peaks["c", 5] == peaks["c", 100_000] == head_dim * 4
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


def test_cached_byte_counts_follow_every_change():
    """nbytes() and meta_bytes() are cached between changes: after every append and compact (and
    asked twice in between, as the session's accounting does) they equal a fresh count of the
    tensors the store holds."""
    st = QuantKVStore(2, D, torch.float32, "cpu", (4, 2), (4, 8), group_size=4, residual=3, track_scores=True,
                      hi_bits=(8, 8), max_hi=2, flagger=SinkOutlierFlags(2, 0.9, 3.0, True))
    g = torch.Generator().manual_seed(5)

    def fresh():
        kv = sum(t.numel() * t.element_size() for hd in st.heads
                 for t in (hd.hk.q, hd.hk.s, hd.hk.z, hd.hv.q, hd.hv.s, hd.hv.z, hd.bk.q, hd.bk.s, hd.bk.z,
                           hd.bv.q, hd.bv.s, hd.bv.z, hd.rk, hd.rv))
        meta = sum(t.numel() * t.element_size() for t in (st.seq, st.pos, st.role, st.valid, st.flag, st.score))
        meta += sum(hd.bk.size.numel() * 8 for hd in st.heads) + st.flagger.nbytes()
        return kv, meta

    s0, seen = 0, set()
    for step, n in enumerate((9, 1, 1, 6, 1, 1, 1, 12, 1)):
        seq = torch.arange(s0, s0 + n)
        st.append(torch.randn(2, n, D, generator=g), torch.randn(2, n, D, generator=g), seq, seq, seq * 0)
        s0 += n
        for _ in range(2):
            assert (st.nbytes(), st.meta_bytes()) == fresh()
        seen.add(st.meta_bytes())
        if step % 2:
            st.compact(torch.rand(st.valid.shape, generator=g) > 0.25)
            assert (st.nbytes(), st.meta_bytes()) == fresh()
    assert len(seen) > 3  # the counts did change along the way


@pytest.mark.parametrize("method,mtype,reader", [("q", "stream_quant", "c-avx2"), ("q", "stream_quant", "c"),
                                                 ("q", "stream_quant", "torch"), ("full", "full", None)])
def test_rows_say_which_reader_read_the_codes(tiny_model_dir, tmp_path, monkeypatch, request, method, mtype, reader):
    """attention_kernel: "c-avx2" / "c" where the C kernel's AVX2 / portable copy read a quantized
    store, "torch" where torch ops did, null for dense storage (scores of the readers agree:
    test_session_blocks_of_five_equal_one_block)."""
    import pyarrow.parquet as pq

    from kvbench.data import make_data
    from kvbench.evaluate import run_eval

    if reader == "torch":
        monkeypatch.setattr(ckernel, "lib", lambda: None)
    elif reader is not None:
        restore = use_copy("avx2" if reader == "c-avx2" else "portable")
        request.addfinalizer(restore)
    data = str(tmp_path / "L96.jsonl")
    make_data({"source": "synthetic"}, 96, 1, 0, data)
    out = str(tmp_path / "r.parquet")
    run_eval(model_dir=tiny_model_dir, task="ppl", data=data, method=method, method_type=mtype, params={},
             budget="full" if mtype == "full" else "48", length=96, out=out, device="cpu")
    row = pq.read_table(out).to_pylist()[0]
    assert row["attention_kernel"] == reader and row["schema_version"] == 6

