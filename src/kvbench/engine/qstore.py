"""Bit-packed KV storage with a full-precision residual window, per-head bits and real eviction.

`QuantKVStore` is a `store.Store` (append, keys_values, mask, observe, live, compact, nbytes,
live_bytes, meta_bytes, tokens_within; (H, C) metadata seq/pos/role/valid/score), so any selection
rule sits on it. The engine builds it from a method's `QuantSpec` (data: bits per head, group size,
residual window, and which tokens go to the high-precision tier, see `SinkOutlierFlags`).
Each KV head h owns three tiers, in this slot order (the (H, C) metadata is padded to the longest head):

  hi     (n_hi, D)  tokens kept at high precision (sinks, outliers): K and V quantized per token
                    at `hi_bits` (or stored as-is at 16); rows are independent, eviction is exact.
  body   (n_b, D)   KIVI (Liu et al. 2024, arXiv:2402.02750): keys per channel in groups of G
                    consecutive tokens (scale/zero (n_groups, D)), values per token in groups of
                    Gv = min(G, D) channels (scale/zero (n_b, D/Gv)); codes bit-packed along D, one
                    row per token. (hi-tier rows are grouped like values.)
  resid  (n_r, D)   the most recent tokens in the cache dtype. Tokens older than the last `residual`
                    leave it in whole groups of G (hi-flagged ones go to `hi` one by one), so
                    n_r <= residual + G - 1 after every append.

Bits are per head (`key_bits[h]`, `value_bits[h]`); 16 means stored unquantized in the cache dtype.
Attention reads the store piece by piece: pieces(h, block) cuts a head's slots into pieces of at
most `block` tokens within one tier, whose keys and values are unpacked to float32 and rescaled in
place one piece at a time (the arithmetic of QTensor.dequantize, never rounded to the cache dtype;
engine.hf attends them), so the full-precision working set is one piece of K or V, reported as
`transient_bytes_peak`; no full-precision copy of the body is kept. On the CPU a piece is unpacked
and rescaled in one pass by a compiled kernel (engine/ckernel.py, deq.c: the same floats); without
a C compiler, by torch ops. When a head's logits fit in memory, tiers(h) lets the kernel compute
logits and weighted values straight from every tier's codes in one call (one row of D floats at a
time). keys_values() still rebuilds
the whole (H, C, D) in the cache dtype (tests, traces). nbytes() is what the tiers allocate: codes +
scales + zeros + residual, per head, so heads of different lengths or bits add no padding; the padded (H, C)
metadata is counted in meta_bytes().

Eviction inside a channel-quantized key group: codes are stored one row per token and a group's
scale/zero stay valid for any subset of its tokens, so compact() drops rows exactly (survivors keep
codes and grid: no extra error, values included); a group's scale/zero are freed with its last
token. A group left with fewer than G tokens is "partial"; a head holds at most MAX_PARTIAL of them
(2: a sink group plus the group a sliding window is eating, so StreamingLLM-like rules never
re-quantize). Beyond that (scattered eviction, e.g. H2O) the partial groups are merged: their
survivors' keys are dequantized, ordered by stream position and re-packed in whole groups of G, the
remainder (< G tokens) as one partial group. A merge adds at most the new group's scale / 2 per key
entry to what attention saw before (a key merged m times carries at most m + 1 half-scales); values
are per token and never re-packed. `bytes_bound` prices all of this for budget conversion.
"""

from __future__ import annotations

from functools import partial

import torch

from ..quant import QTensor, packed_len, quantize, quantized_nbytes, unpack_codes, unpack_float
from . import ckernel
from .store import Store

MAX_PARTIAL = 2
META = ("seq", "pos", "role", "valid", "flag", "score")
FEW = 8  # evicted rows per head and step up to which compact() cuts tiers around them (host lists)


def _nb(*ts) -> int:
    n = 0
    for t in ts:  # (a loop: summed at every append and compact)
        n += t.nbytes
    return n


def _f32(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x in float32 and the bytes that took (0: x already is)."""
    y = x.float()
    return y, 0 if y is x else _nb(y)


def _cut(t: torch.Tensor, drop: list[int]) -> torch.Tensor:
    """t without rows `drop` (ascending host ints, a few): the runs between them, concatenated into
    one new tensor (the old one is freed; a slice would keep its storage alive)."""
    parts, lo = [], 0
    for r in drop:
        if r > lo:
            parts.append(t[lo:r])
        lo = r + 1
    if lo < t.shape[0]:
        parts.append(t[lo:])
    return torch.cat(parts) if parts else t[:0].clone()


def _float_desc(x: torch.Tensor, start: int) -> tuple[list[int], list[torch.Tensor], int]:
    """Float rows x (n, D) for kvb_qk_tiers at head slot `start`: read in place in float32, else
    from a float32 copy (its bytes returned: a transient of attention)."""
    y, nbytes = _f32(x)
    return [ckernel.FLOAT_ROWS, 32, start, y.shape[0], y.data_ptr(), y.stride(0)] + [0] * 10, [y], nbytes


class SinkOutlierFlags:
    """Called by QuantKVStore.append with keys (H, n, D) and seq (n,): returns (H, n) bool, True for
    tokens to keep at high precision: the first `n_sink` of the stream, and (`detect`) outliers, a
    token whose key norm exceeds `threshold` x the running EMA of its head's key norms (decay
    `decay`, over ordinary tokens in stream order; the first chunk seeds it with its median). Holds
    the EMA (H,) of one layer: store state, counted in meta_bytes."""

    def __init__(self, n_sink: int, decay: float, threshold: float, detect: bool):
        self.n_sink, self.decay, self.threshold, self.detect = n_sink, decay, threshold, detect
        self.ema: torch.Tensor | None = None

    def __call__(self, k: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(k.float(), dim=-1)  # (H, n); Tensor.norm: same kernel, slower
        sink = (seq < self.n_sink)[None].expand_as(norm)
        if not self.detect:
            return sink.clone()
        ordinary = ~sink
        if self.ema is None:
            if not bool(ordinary.any()):
                return sink.clone()
            self.ema = norm[:, ordinary[0]].median(dim=1).values  # seed: the first chunk's median
        if norm.shape[1] == 1:  # one token (a decode step): the recursion itself, in fewer ops, no host sync
            s = sink[:, 0]
            out = ~s & (norm[:, 0] > self.threshold * self.ema)  # (H,)
            self.ema = torch.where(s | out, self.ema, self.decay * self.ema + (1 - self.decay) * norm[:, 0])
            return (s | out)[:, None]
        out = ordinary & (norm > self.threshold * self.ema[:, None])
        upd = ordinary & ~out  # EMA over ordinary tokens, in stream order: closed form of the recursion
        cnt = upd.sum(dim=1, keepdim=True)
        rank = torch.cumsum(upd.long(), dim=1) - 1
        w = (1 - self.decay) * self.decay ** (cnt - 1 - rank).clamp(min=0).float() * upd
        self.ema = self.decay ** cnt[:, 0].float() * self.ema + (w * norm).sum(dim=1)
        return sink | out

    def nbytes(self) -> int:
        return 0 if self.ema is None else self.ema.numel() * self.ema.element_size()


class Rows:
    """(n, D) tokens quantized one row at a time (groups of G channels, axis "token")."""

    def __init__(self, d, bits, g, dtype, device, sdt):
        self.d, self.bits, self.g, self.sdt = d, bits, g, sdt
        raw = bits == 16
        self.q = torch.empty(0, d if raw else packed_len(d, bits), dtype=dtype if raw else torch.uint8, device=device)
        self.s = torch.empty(0, 0 if raw else d // g, dtype=sdt, device=device)  # (n, D/G)
        self.z = self.s.clone()

    def __len__(self) -> int:
        return self.q.shape[0]

    def add(self, x: torch.Tensor) -> None:
        if self.bits == 16:
            self.q = torch.cat([self.q, x.to(self.q.dtype)])
            return
        t = quantize(x, self.bits, self.g, "token", self.sdt)
        self.q, self.s, self.z = (torch.cat(p) for p in ((self.q, t.packed), (self.s, t.scale), (self.z, t.zero)))

    def take(self, idx: torch.Tensor) -> None:
        self.q = self.q.index_select(0, idx)  # (index_select: x[idx] copies rows up to 15x slower on CPU)
        if self.bits < 16:
            self.s, self.z = self.s.index_select(0, idx), self.z.index_select(0, idx)

    def drop(self, rows: list[int]) -> bool:
        """Drop rows `rows` (ascending host ints, a few); survivors keep their order (True)."""
        self.q = _cut(self.q, rows)
        if self.bits < 16:
            self.s, self.z = _cut(self.s, rows), _cut(self.z, rows)
        return True

    def keep(self, keep: torch.Tensor, seq: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Drop rows where keep (n,) is False; the survivors' old indices, in order (True)."""
        idx = keep.nonzero().squeeze(1)
        self.take(idx)
        return idx, True

    def deq(self, dtype, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Rows lo:hi (default all) in `dtype`: a new tensor (a transient of attention)."""
        hi = len(self) if hi is None else hi
        if self.bits < 16 and hi <= lo:
            return torch.empty(0, self.d, dtype=dtype, device=self.q.device)
        q = self.q[lo:hi]
        if self.bits == 16:
            return q.to(dtype, copy=True)
        return QTensor(q, self.s[lo:hi], self.z[lo:hi], self.bits, self.g, "token", (hi - lo, self.d)).dequantize(dtype)

    def fused(self) -> bool:
        """Whether deq32 runs the C kernel (ckernel): quantized rows, CPU, contiguous."""
        return self.bits < 16 and ckernel.lib() is not None and ckernel.usable(self.q, self.s, self.z)

    def spans(self, block: int) -> list[tuple[int, int, None]]:
        """Rows cut into pieces (lo, hi, None) of at most `block` rows (any cut: scales are per row)."""
        n = len(self)
        return [(lo, min(lo + block, n), None) for lo in range(0, n, block)]

    def deq32(self, lo: int, hi: int, runs=None) -> tuple[torch.Tensor, int]:
        """Rows lo:hi in float32 for attention, and the bytes the call allocated at its peak (0: a
        view of a float32 store). The arithmetic of QTensor.dequantize (codes * scale + zero in
        float32, each rounded), in place on the unpacked codes: the same floats."""
        if self.bits == 16:
            return _f32(self.q[lo:hi])
        if self.fused():  # one pass, same floats
            return ckernel.deq_rows(self.q, self.s, self.z, lo, hi, self.d, self.bits, self.g), (hi - lo) * self.d * 4
        c, work = unpack_float(self.q[lo:hi], self.bits, self.d)
        x = c.view(hi - lo, self.d // self.g, self.g)
        # scales widened first (a small copy): mixed-precision elementwise ops over the block are slow on
        # CPU; a multiply then an add (as dequantize rounds), not addcmul: 4x slower on a per-row scale
        x.mul_(self.s[lo:hi, :, None].float()).add_(self.z[lo:hi, :, None].float())
        return c, work

    def desc(self, start: int) -> tuple[list[int], list[torch.Tensor], int]:
        """This tier for deq.c's kvb_qk_tiers / kvb_pv_tiers, at head slot `start`: its description,
        the tensors it points into and the bytes of any float32 copy made for it (16 bits in a
        half-precision cache; QuantKVStore.tiers decides when a copy is bounded)."""
        if self.bits < 16:
            return ([ckernel.TOKEN_CODES, self.bits, start, len(self), self.q.data_ptr(), self.q.stride(0),
                     self.s.data_ptr(), self.z.data_ptr(), self.s.stride(0), ckernel.SCALE_DTYPES[self.sdt], self.g,
                     0, 0, 0, 0, 0], [self.q, self.s, self.z], 0)
        return _float_desc(self.q, start)

    def nbytes(self) -> int:
        return _nb(self.q, self.s, self.z)


class ChannelKeys:
    """(n, D) keys quantized per channel in groups of consecutive tokens; one code row per token,
    rows stored group after group, `size` (n_groups,) tokens per group (G, or fewer if partial)."""

    def __init__(self, d, bits, g, device, sdt):
        self.d, self.bits, self.g, self.sdt = d, bits, g, sdt
        self.q = torch.empty(0, packed_len(d, bits), dtype=torch.uint8, device=device)
        self.s = torch.empty(0, d, dtype=sdt, device=device)  # (n_groups, D)
        self.z = self.s.clone()
        self.size = torch.empty(0, dtype=torch.long, device=device)
        self._spans = (None, 0, [])
        self._host = (None, [])  # (the `size` tensor, its values as a host list) for drop()

    def add(self, x: torch.Tensor) -> None:
        """x (n, D): whole groups of G, or one partial group (n < G)."""
        g = self.g if x.shape[0] % self.g == 0 else x.shape[0]
        t = quantize(x, self.bits, g, "channel", self.sdt)
        self.q, self.s, self.z = (torch.cat(p) for p in ((self.q, t.packed), (self.s, t.scale), (self.z, t.zero)))
        self.size = torch.cat([self.size, self.size.new_full((x.shape[0] // g,), g)])

    def deq(self, dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `rows` (an index tensor), else every row, in `dtype` (attention reads deq32's pieces)."""
        n = self.q.shape[0]
        if not n:
            return torch.empty(0, self.d, dtype=dtype, device=self.q.device)
        s, z = self.s.float(), self.z.float()  # exact; widened before expanding (half ops are slow on CPU)
        if rows is None:  # every row: scales expanded group by group, no index tensor
            q, s, z = self.q, s.repeat_interleave(self.size, dim=0, output_size=n), \
                z.repeat_interleave(self.size, dim=0, output_size=n)
        else:
            gid = torch.repeat_interleave(torch.arange(len(self.size), device=self.q.device), self.size)[rows]
            q, s, z = self.q[rows], s[gid], z[gid]
        c = unpack_codes(q, self.bits, self.d).float()  # same arithmetic as QTensor.dequantize
        return (c * s + z).to(dtype)

    def spans(self, block: int) -> list[tuple[int, int, list[tuple[int, int, int, int]]]]:
        """Rows cut into pieces (lo, hi, runs) of at most `block` rows, cut at group ends (a group
        longer than `block` is cut inside); `runs` [(offset, g0, k, gs)]: piece rows offset:offset +
        k * gs are groups g0..g0+k-1 of gs rows each (or, cut inside, gs rows of group g0, k = 1), so
        deq32 rescales each run with a broadcast view of its groups' scales. Cached per `size`."""
        if self._spans[0] is self.size and self._spans[1] == block:
            return self._spans[2]
        sizes = self.size.tolist()
        out, row, j = [], 0, 0
        while j < len(sizes):
            if sizes[j] > block:
                out += [(row + a, row + min(a + block, sizes[j]), [(0, j, 1, min(block, sizes[j] - a))])
                        for a in range(0, sizes[j], block)]
                row, j = row + sizes[j], j + 1
                continue
            lo, runs = row, []
            while j < len(sizes) and row + sizes[j] - lo <= block:
                if runs and runs[-1][3] == sizes[j]:
                    runs[-1] = (*runs[-1][:2], runs[-1][2] + 1, sizes[j])
                else:
                    runs.append((row - lo, j, 1, sizes[j]))
                row, j = row + sizes[j], j + 1
            out.append((lo, row, runs))
        self._spans = (self.size, block, out)
        return out

    def deq32(self, lo: int, hi: int, runs: list[tuple[int, int, int, int]]) -> tuple[torch.Tensor, int]:
        """Rows lo:hi in float32, and the bytes the call allocated at its peak: the arithmetic of deq
        (codes * scale + zero in float32, each rounded: the same floats). The C kernel (`fused`) reads
        any rows in one pass; the torch path needs a piece of `spans` and its `runs`, unpacks it and
        rescales each run of equal groups in place through a broadcast view (no per-row scale tensor)."""
        if self.fused():  # one pass; `runs` unused
            return ckernel.deq_chan(self.q, self.s, self.z, self.size, lo, hi, self.d, self.bits), (hi - lo) * self.d * 4
        c, work = unpack_float(self.q[lo:hi], self.bits, self.d)
        for r0, g0, k, gs in runs:
            x = c[r0:r0 + k * gs].view(k, gs, self.d)
            x.mul_(self.s[g0:g0 + k, None].float()).add_(self.z[g0:g0 + k, None].float())
        return c, work

    def fused(self) -> bool:
        """Whether deq32 runs the C kernel (ckernel), which needs no runs and reads any cut."""
        return ckernel.lib() is not None and ckernel.usable(self.q, self.s, self.z, self.size)

    def desc(self, start: int) -> tuple[list[int], list[torch.Tensor], int]:
        """This tier for deq.c's kvb_qk_tiers at head slot `start` (Rows.desc's contract)."""
        return ([ckernel.CHANNEL_CODES, self.bits, start, self.q.shape[0], self.q.data_ptr(), self.q.stride(0),
                 self.s.data_ptr(), self.z.data_ptr(), self.s.stride(0), ckernel.SCALE_DTYPES[self.sdt], 0,
                 self.size.data_ptr(), self.size.shape[0], 0, 0, 0], [self.q, self.s, self.z, self.size], 0)

    def drop(self, rows: list[int]) -> bool:
        """Drop rows `rows` (ascending host ints, a few) when that leaves at most MAX_PARTIAL partial
        groups: the rows are cut out, group sizes counted on the host, a group's scale and zero freed
        with its last row; survivors keep their order. False (nothing done): a merge is due, use keep()."""
        if self._host[0] is not self.size:
            self._host = (self.size, self.size.tolist())
        sizes = self._host[1]
        left, g, end = list(sizes), 0, sizes[0]  # group g holds rows end - sizes[g] .. end - 1
        for r in rows:
            while end <= r:
                g += 1
                end += sizes[g]
            left[g] -= 1
        if sum(1 for x in left if 0 < x < self.g) > MAX_PARTIAL:
            return False
        self.q = _cut(self.q, rows)
        dead = [i for i, x in enumerate(left) if x == 0]
        if dead:
            self.s, self.z = _cut(self.s, dead), _cut(self.z, dead)
            left = [x for x in left if x]
        self.size = torch.tensor(left, dtype=torch.long, device=self.size.device)
        self._host = (self.size, left)
        return True

    def keep(self, keep: torch.Tensor, seq: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Drop rows where keep (n,) is False. Returns the surviving rows' old indices in their new
        order, and whether that is their old order (False: partial groups were merged, see the module
        docstring). Survivors per group come from the dropped rows (few per step) located among the
        groups' ends; scales and zeros are copied only when a group loses its last token."""
        dropped = (~keep).nonzero().squeeze(1)
        ends = torch.cumsum(self.size, 0)
        left = self.size.index_add(0, torch.searchsorted(ends, dropped, right=True), torch.full_like(dropped, -1))
        alive, partial = left > 0, (left > 0) & (left < self.g)
        n_alive, n_partial = torch.stack([alive.sum(), partial.sum()]).tolist()
        if n_partial <= MAX_PARTIAL:
            rows = keep.nonzero().squeeze(1)
            self.q = self.q.index_select(0, rows)
            if n_alive == left.shape[0]:  # every group keeps a token: its scale and zero stay
                self.size = left
            else:
                groups = alive.nonzero().squeeze(1)
                self.s, self.z, self.size = (t.index_select(0, groups) for t in (self.s, self.z, left))
            return rows, True
        gid = torch.repeat_interleave(torch.arange(len(self.size), device=keep.device), self.size)
        merge = keep & partial[gid]
        rows = (keep & ~merge).nonzero().squeeze(1)
        mrows = merge.nonzero().squeeze(1)
        mrows = mrows[torch.argsort(seq[mrows], stable=True)]
        x = self.deq(torch.float32, mrows)  # (m, D) what attention saw
        full = alive & ~partial
        groups = full.nonzero().squeeze(1)
        self.q, self.s, self.z, self.size = (t.index_select(0, i) for t, i in
                                             ((self.q, rows), (self.s, groups), (self.z, groups), (left, groups)))
        f = x.shape[0] // self.g * self.g
        if f:
            self.add(x[:f])
        if f < x.shape[0]:
            self.add(x[f:])
        return torch.cat([rows, mrows]), False

    def nbytes(self) -> int:
        return _nb(self.q, self.s, self.z)


def value_group(group_size: int, d: int) -> int:
    """Channels per group of a per-token (value, hi-tier) row: G, or the whole row when G >= D (as
    KIVI's G = 128 on head_dim 128 quantizes each value row as one group)."""
    return min(group_size, d)


class _Head:
    def __init__(self, d, kb, vb, hi_bits, g, dtype, device, sdt):
        gv = value_group(g, d)
        self.hk, self.hv = (Rows(d, b, gv, dtype, device, sdt) for b in hi_bits)
        self.bk = Rows(d, 16, gv, dtype, device, sdt) if kb == 16 else ChannelKeys(d, kb, g, device, sdt)
        self.bv = Rows(d, vb, gv, dtype, device, sdt)
        self.rk = torch.empty(0, d, dtype=dtype, device=device)  # (n_r, D)
        self.rv = self.rk.clone()
        self.n_hi = self.n_body = 0

    def nbytes(self) -> int:
        return self.hk.nbytes() + self.hv.nbytes() + self.bk.nbytes() + self.bv.nbytes() + _nb(self.rk, self.rv)


class QuantKVStore(Store):
    """Tiered, packed K/V storage per head (module docstring); padded (H, C) metadata."""

    layout = "packed_quant"
    compute = "dequantized"
    blockwise = True  # attention dequantizes one piece of a head at a time (pieces)
    ordered = False  # hi tier (sinks, outliers) first, merged key groups re-packed: not stream order

    def __init__(self, n_heads: int, head_dim: int, dtype, device, key_bits, value_bits, group_size: int,
                 residual: int, track_scores: bool = False, hi_bits=(16, 16), max_hi: int = 0,
                 flagger=None, scale_dtype=torch.float16):
        super().__init__(n_heads, head_dim, dtype, device)
        e = dict(device=device)
        self.seq = torch.empty(n_heads, 0, dtype=torch.long, **e)  # (H, C)
        self.pos = torch.empty(n_heads, 0, dtype=torch.long, **e)
        self.role = torch.empty(n_heads, 0, dtype=torch.int8, **e)
        self.valid = torch.empty(n_heads, 0, dtype=torch.bool, **e)
        self.score = torch.empty(n_heads, 0, dtype=torch.float32, **e) if track_scores else None
        self.g, self.residual, self.max_hi, self.flagger = group_size, residual, max_hi, flagger
        self.key_bits, self.value_bits, self.hi_bits = list(key_bits), list(value_bits), tuple(hi_bits)
        self.scale_dtype = scale_dtype
        self.heads = [_Head(head_dim, kb, vb, hi_bits, group_size, dtype, device, scale_dtype)
                      for kb, vb in zip(self.key_bits, self.value_bits)]
        self.flag = torch.empty(n_heads, 0, dtype=torch.bool, device=device)  # True: to `hi` on leaving resid
        self._nbytes: int | None = None  # nbytes(), until the next append or compact
        self._meta_bytes: int | None = None  # meta_bytes(), likewise

    # ---- growth and attention inputs -------------------------------------------------------
    def append(self, k, v, seq, pos, role) -> None:
        """k, v: (H, n, D); seq, pos, role: (n,) shared by all heads. Head h's new tokens take its
        slots n_live[h] .. n_live[h] + n (its padding first, written in place; the (H, C) metadata
        grows only by what the longest head needs); the slots are rebuilt only when a flagged token
        leaves the residual window for the hi tier (the one move that reorders a head's slots)."""
        self._nbytes = self._meta_bytes = None
        n, c, lens = k.shape[1], self.seq.shape[1], list(self.n_live)
        dev = k.device
        self._last_seq = seq
        flag = self.flagger(k, seq) if self.flagger else torch.zeros(self.h, n, dtype=torch.bool, device=dev)
        new = dict(seq=seq.expand(self.h, n), pos=pos.expand(self.h, n), role=role.to(torch.int8).expand(self.h, n),
                   valid=flag.new_ones(self.h, n), flag=flag, score=torch.zeros(self.h, n, device=dev))
        top = max(lens, default=0) + n
        lo = min(lens, default=0)
        slots = None if lo + n == top else torch.tensor(lens, device=dev)[:, None] + torch.arange(n, device=dev)
        for name in META:
            t = getattr(self, name)
            if t is None:
                continue
            if slots is None and lo == c:  # every head at the full width: the new columns, appended
                setattr(self, name, torch.cat([t, new[name].to(t.dtype)], 1))
                continue
            if top > c:  # padding columns: zeros (not valid), as _regather leaves them
                t = torch.cat([t, t.new_zeros(self.h, top - c)], 1)
                setattr(self, name, t)
            if slots is None:  # every head at the same length: one slice
                t[:, lo:top] = new[name]
            else:
                t.scatter_(1, slots, new[name].to(t.dtype))
        idxs, moved = [], False
        for h, hd in enumerate(self.heads):
            hd.rk, hd.rv = torch.cat([hd.rk, k[h].to(self.dtype)]), torch.cat([hd.rv, v[h].to(self.dtype)])
            f = self.flag[h, :lens[h] + n]  # the head's live slots, new tokens included
            order = self._flush(hd, f) if self._flushes(hd, lens[h] + n, f) else None
            idxs.append(order)
            moved = moved or order is not None
        self.n_live = [x + n for x in lens]
        if moved:
            self._regather([torch.arange(m, device=dev) if i is None else i for i, m in zip(idxs, self.n_live)])

    def _flushes(self, hd: _Head, n: int, flag: torch.Tensor) -> bool:
        """Whether `_flush` would move anything out of the residual window of a head holding n
        tokens (flag: the head's row, slots in tier order): a whole group of G older than the window,
        or a flagged token among the older ones while `hi` has room. Most steps move nothing (the
        window runs up to G - 1 tokens over `residual` between flushes); skipping them skips the
        slot rebuild (`_regather`)."""
        b = hd.n_hi + hd.n_body
        old = n - b - self.residual
        if old <= 0:
            return False
        return old >= self.g or (self.max_hi > hd.n_hi and bool(flag[b:b + old].any()))

    def _flush(self, hd: _Head, flag: torch.Tensor) -> torch.Tensor | None:
        """Move residual tokens older than the window out: flagged ones to `hi` (while it has room),
        the rest to the body in whole groups of G. Returns the head's new slot order, or None when
        that is the old one (nothing went to `hi`: the body's new groups were the residual's oldest
        tokens, right after it)."""
        n, a = flag.shape[0], hd.n_hi
        b = a + hd.n_body
        old = n - b - self.residual
        if old <= 0:
            return None
        room = self.max_hi - a
        hi = flag[b:b + old].nonzero().squeeze(1)[:room] if room > 0 else None  # residual-relative
        if hi is None or not hi.numel():  # the oldest whole groups go to the body; the slot order stays
            m = old // self.g * self.g
            if m:
                hd.bk.add(hd.rk[:m]), hd.bv.add(hd.rv[:m])
                hd.rk, hd.rv = hd.rk[m:].clone(), hd.rv[m:].clone()  # (clones: a view would hold the old rows)
                hd.n_body += m
            return None
        rest = torch.ones(old, dtype=torch.bool, device=flag.device)
        rest[hi] = False
        normal = rest.nonzero().squeeze(1)
        body = normal[: normal.shape[0] // self.g * self.g]
        stay = torch.ones(n - b, dtype=torch.bool, device=flag.device)
        stay[hi], stay[body] = False, False
        hd.hk.add(hd.rk[hi]), hd.hv.add(hd.rv[hi])
        if body.numel():
            hd.bk.add(hd.rk[body]), hd.bv.add(hd.rv[body])
        hd.rk, hd.rv = hd.rk[stay], hd.rv[stay]
        hd.n_hi, hd.n_body = a + hi.numel(), hd.n_body + body.numel()
        ar = torch.arange(n, device=flag.device)
        return torch.cat([ar[:a], b + hi, ar[a:b], b + body, b + stay.nonzero().squeeze(1)])

    def _regather(self, idxs: list[torch.Tensor]) -> None:
        """Rebuild the padded (H, C) metadata: head h's slots become old slots idxs[h], in order."""
        self.n_live = [i.shape[0] for i in idxs]
        c = max(self.n_live, default=0)
        ragged = min(self.n_live, default=0) != c
        dev = self.seq.device
        if ragged:
            idx = torch.nn.utils.rnn.pad_sequence(idxs, batch_first=True)  # (H, c), padded with slot 0
            self.valid = torch.arange(c, device=dev)[None, :] < torch.tensor(self.n_live, device=dev)[:, None]
        else:
            idx = torch.stack(idxs) if idxs else torch.empty(0, 0, dtype=torch.long, device=dev)
            self.valid = torch.ones(self.h, c, dtype=torch.bool, device=dev)
        pad = ~self.valid if ragged else None  # (H, c) padding slots, zeroed in every field
        for name in META:
            t = getattr(self, name)
            if t is None or name == "valid":
                continue
            out = t.gather(1, idx)
            if ragged:
                out.masked_fill_(pad, 0)
            setattr(self, name, out)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, C, D) dequantized keys and values in the cache dtype, zeros in padding slots. A
        transient of the forward pass (not kept: the store holds only codes and the residual)."""
        c = self.seq.shape[1]
        ks = torch.empty(self.h, c, self.d, dtype=self.dtype, device=self.device)
        vs = torch.empty_like(ks)
        for h, hd in enumerate(self.heads):
            a, b = hd.n_hi, hd.n_hi + hd.n_body
            n = b + hd.rk.shape[0]
            if a:
                ks[h, :a], vs[h, :a] = hd.hk.deq(self.dtype), hd.hv.deq(self.dtype)
            if b > a:
                ks[h, a:b], vs[h, a:b] = hd.bk.deq(self.dtype), hd.bv.deq(self.dtype)
            if n > b:
                ks[h, b:n], vs[h, b:n] = hd.rk, hd.rv
            if n < c:
                ks[h, n:], vs[h, n:] = 0, 0
        return ks, vs

    def pieces(self, h: int, block: int) -> list[tuple[int, int, partial, partial]]:
        """Head h's live slots as consecutive pieces (start slot, n, keys, values) of at most `block`
        tokens, each within one tier (body pieces cut at key-group ends where groups fit a block);
        keys() and values() return the piece's (n, D) float32 rows and the bytes that call allocated:
        attention reads one piece's keys or values at a time, so its full-precision working set is a
        block, never the cache. Rows stored in float32 (residual, 16-bit tiers) come as views (0 bytes)."""
        hd = self.heads[h]
        a, b, n = hd.n_hi, hd.n_hi + hd.n_body, self.n_live[h]
        out = [(lo, hi - lo, partial(hd.hk.deq32, lo, hi), partial(hd.hv.deq32, lo, hi))
               for lo, hi, _ in hd.hk.spans(block)]
        if isinstance(hd.bk, ChannelKeys) and hd.bk.fused():  # the kernel finds each row's group: any cut
            body = [(lo, min(lo + block, hd.n_body), None) for lo in range(0, hd.n_body, block)]
        else:
            body = hd.bk.spans(block)
        out += [(a + lo, hi - lo, partial(hd.bk.deq32, lo, hi, runs), partial(hd.bv.deq32, lo, hi))
                for lo, hi, runs in body]
        for lo in range(b, n, block):
            r = slice(lo - b, min(lo + block, n) - b)
            out.append((lo, r.stop - r.start, partial(_f32, hd.rk[r]), partial(_f32, hd.rv[r])))
        return out

    def tiers(self, h: int) -> tuple[ckernel.Tiers, int] | None:
        """Head h's tiers for the C kernel's one-call attention (ckernel.qk_tiers / pv_tiers): logits
        and weighted values straight from the codes, one dequantized row of D floats at a time, no
        float32 block; and the bytes of float32 copies made for it (float tiers of a half-precision
        cache: the residual window and the hi tier, both bounded). None when the kernel cannot read
        this head: no compiler, not on the CPU, or 16-bit body keys or values in a half-precision
        cache (a copy of the whole body: pieces() reads it block by block instead)."""
        if ckernel.lib() is None or not self.seq.is_cpu:  # (tiers are contiguous by construction: cat,
            return None  # index_select and _cut make new tensors; tests assert it)
        hd = self.heads[h]
        a, b = hd.n_hi, hd.n_hi + hd.n_body
        if b > a and 16 in (hd.bk.bits, hd.bv.bits) and self.dtype != torch.float32:
            return None
        parts = [hd.hk.desc(0), hd.hv.desc(0)] if a else []
        if b > a:
            parts += [hd.bk.desc(a), hd.bv.desc(a)]
        if hd.rk.shape[0]:
            parts += [_float_desc(hd.rk, b), _float_desc(hd.rv, b)]
        tiers = ckernel.Tiers([v for dv, _, _ in parts for v in dv], [t for _, kp, _ in parts for t in kp])
        return tiers, sum(nb for *_, nb in parts) + self.d * 4

    # ---- eviction ------------------------------------------------------------------------
    def compact(self, keep: torch.Tensor) -> None:
        """Keep the slots where keep (H, C) is True; frees codes, scales and residual rows. The
        evicted slots (a few per step) are read on the host, so a head or a tier that loses none is
        not copied."""
        self._nbytes = self._meta_bytes = None
        keep = keep & self.valid
        gone = (self.valid & ~keep).nonzero().tolist()  # [[head, slot]]
        if not gone:
            return
        lost = [[] for _ in self.heads]
        for h, slot in gone:
            lost[h].append(slot)
        idxs = []  # per head: its survivors' old slots in their new order; None: the kept slots, in order
        for h, hd in enumerate(self.heads):
            n = self.n_live[h]  # live slots are a prefix of each head's row
            if not lost[h] or (len(lost[h]) <= FEW and self._drop(hd, lost[h])):
                idxs.append(None)
                continue
            a, b, kh = hd.n_hi, hd.n_hi + hd.n_body, keep[h, :n]
            in_order = True
            if min(lost[h]) < a:
                hi = kh[:a].nonzero().squeeze(1)
                hd.hk.take(hi), hd.hv.take(hi)
                hd.n_hi = hi.numel()
            if any(a <= s < b for s in lost[h]):
                body, in_order = hd.bk.keep(kh[a:b], self.seq[h, a:b])
                hd.bv.take(body)
                hd.n_body = body.numel()
            if max(lost[h]) >= b:
                res = kh[b:].nonzero().squeeze(1)
                hd.rk, hd.rv = hd.rk.index_select(0, res), hd.rv.index_select(0, res)
            if in_order:  # survivors keep their order: the tiers' new slots are the kept ones
                idxs.append(None)
            else:
                idxs.append(torch.cat([kh[:a].nonzero().squeeze(1), a + body, b + kh[b:].nonzero().squeeze(1)]))
        counts = {len(x) for x in lost}
        if len(counts) == 1 and all(i is None for i in idxs):  # every head lost k slots, order kept:
            k = counts.pop()  # row h keeps every slot but lost[h] (its padding last, as before)
            dev, c = keep.device, self.seq.shape[1] - k
            ar = torch.arange(c, device=dev)
            # new slot j is old slot j + the number of lost slots l_i with l_i - i <= j (lost ascending)
            adj = torch.tensor(lost, device=dev) - torch.arange(k, device=dev)
            idx = ar + (ar >= adj[:, :1])
            for i in range(1, k):
                idx += ar >= adj[:, i:i + 1]
            for name in META:
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, t.gather(1, idx))
            self.n_live = [x - k for x in self.n_live]
            return
        self._regather([keep[h, :n].nonzero().squeeze(1) if i is None else i
                        for h, (i, n) in enumerate(zip(idxs, self.n_live))])

    def _drop(self, hd: _Head, slots: list[int]) -> bool:
        """Cut a few evicted slots (ascending) out of head hd's tiers, survivors in order; False
        (nothing done) when its channel keys would need a merge (ChannelKeys.drop)."""
        a, b = hd.n_hi, hd.n_hi + hd.n_body
        body = [x - a for x in slots if a <= x < b]
        if body and not hd.bk.drop(body):
            return False
        if body:
            hd.bv.drop(body)
            hd.n_body -= len(body)
        hi = [x for x in slots if x < a]
        if hi:
            hd.hk.drop(hi), hd.hv.drop(hi)
            hd.n_hi -= len(hi)
        res = [x - b for x in slots if x >= b]
        if res:
            hd.rk, hd.rv = _cut(hd.rk, res), _cut(hd.rv, res)
        return True

    # ---- accounting ----------------------------------------------------------------------
    def nbytes(self) -> int:
        """Codes + scales + zeros + residual, per head (no padding in K/V storage); summed once per
        change of the store (append and compact reset it), as live_bytes asks for it too."""
        if self._nbytes is None:
            self._nbytes = sum(hd.nbytes() for hd in self.heads)
        return self._nbytes

    def live_bytes(self) -> int:
        return self.nbytes()

    def meta_bytes(self) -> int:
        """The (H, C) metadata, key-group sizes and the flagger's state; cached like nbytes."""
        if self._meta_bytes is None:
            ts = [getattr(self, n) for n in META if getattr(self, n) is not None]
            ts += [hd.bk.size for hd in self.heads if isinstance(hd.bk, ChannelKeys)]
            self._meta_bytes = _nb(*ts) + (self.flagger.nbytes() if hasattr(self.flagger, "nbytes") else 0)
        return self._meta_bytes

    def tier_bytes(self) -> dict:
        """Bytes each tier allocates, summed over heads: hi, body (codes + scales + zeros), res."""
        return dict(hi=sum(hd.hk.nbytes() + hd.hv.nbytes() for hd in self.heads),
                    body=sum(hd.bk.nbytes() + hd.bv.nbytes() for hd in self.heads),
                    res=sum(_nb(hd.rk, hd.rv) for hd in self.heads))

    def counts(self) -> list[dict]:
        """Per head: tokens in each tier and the body's key-group sizes (for tests and reports)."""
        return [dict(hi=hd.n_hi, body=hd.n_body, res=hd.rk.shape[0],
                     groups=hd.bk.size.tolist() if isinstance(hd.bk, ChannelKeys) else [])
                for hd in self.heads]

    def tokens_within(self, allowance: list[int]) -> list[int]:
        return [max_tokens(a, **self.cost_args(h)) for h, a in enumerate(allowance)]

    def cost_args(self, h: int) -> dict:
        return dict(d=self.d, dtype=self.dtype, key_bits=self.key_bits[h], value_bits=self.value_bits[h],
                    group_size=self.g, residual=self.residual, n_hi=self.max_hi, hi_bits=self.hi_bits,
                    scale_dtype=self.scale_dtype)


def bytes_bound(n: int, d: int, dtype, key_bits: int, value_bits: int, group_size: int, residual: int,
                n_hi: int = 0, hi_bits=(16, 16), scale_dtype=torch.float16) -> int:
    """Most bytes one head can allocate holding n tokens: the dearest tiers filled first (residual
    <= residual + G - 1 tokens at full price, then up to n_hi high-precision tokens, then the body
    with at most MAX_PARTIAL partial key groups). Assumes hi bits >= body bits."""
    row = lambda b: quantized_nbytes((1, d), b, value_group(group_size, d), "token", scale_dtype, dtype)  # noqa: E731
    r = min(n, residual + group_size - 1)
    hi = min(n - r, n_hi)
    body = n - r - hi
    out = r * 2 * row(16) + hi * (row(hi_bits[0]) + row(hi_bits[1])) + body * row(value_bits)
    if key_bits == 16:
        return out + body * row(16)
    q = min(MAX_PARTIAL, body)
    groups = (body - q) // group_size + q
    return out + body * packed_len(d, key_bits) + groups * 2 * d * torch.empty(0, dtype=scale_dtype).element_size()


def max_tokens(allowance: int, **cost) -> int:
    """Largest n with bytes_bound(n, **cost) <= allowance (bytes)."""
    lo, hi = 0, 1
    while bytes_bound(hi, **cost) <= allowance:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if bytes_bound(mid, **cost) <= allowance else (lo, mid)
    return lo
