"""Per-layer KV storage with real eviction and per-head ragged lengths (no transformers import).

Layout: one buffer per layer, (H, cap, D) for keys and values, H = KV heads, cap = allocated
slots, of which the first C are in use (`k`, `v`, and the metadata are views of that prefix). Each
slot carries metadata beside the tensors: `seq` (stream order, drives causality), `pos` (the original
position: the one the key was rotated with, or, for a session that re-indexes positions, where keys are
stored before RoPE, the one re-indexing starts from), `role` (instruction / source / target), `valid`, and optionally
`score` (accumulated attention, for H2O-like rules). Heads may hold different numbers of live
entries (head-aware budgets): C is the largest head's count of slots in use, the others have free
slots (`valid` False) among theirs.

Eviction is in place (`inplace=True`, the default): `compact` only marks the evicted slots free, and
`append` writes new tokens into each head's free slots first (lowest slot first), past C only when a
head has no free slot left. A cache at budget B therefore reaches B + 1 slots once (the token being
written) and never reallocates or copies again: a decode step costs what a full cache of B + 1 slots
costs, plus the selection rule. Slots are then no longer in stream order (`ordered` turns False at the
first reused slot): selection rules rank by `seq`, never by slot. `new_slots` gives the slots the last
append wrote (attention rotates and windows the new queries by them).

`inplace=False` keeps the compacting store this replaced, as the reference the tests compare against
(same entries kept at every step): `compact` gathers the survivors, in stream order, into a fresh
buffer of (largest head's count + `reserve`) slots and drops the old one.

Capacity (what `nbytes()` reports: the bytes allocated, spare slots and padding included): `append`
writes new tokens in place while they fit; otherwise it reallocates to the slots needed plus
`grow_slack(n)` spare slots when the store is unbounded (no budget: the full cache; 3% of n, so decoding
copies the cache once every ~n/32 steps, not at every step), none under a budget.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


def grow_slack(n: int) -> int:
    """Spare slots added when a growing (never evicted) cache must reallocate to n slots."""
    return -(-n // 32)


class Store(ABC):
    """What the engine and the selection rules see of one layer's cache, whatever its storage.

    Every store has the (H, C) metadata `seq`, `pos`, `role`, `valid` and `score` (None unless the
    method needs scores), host-side live counts `n_live`, and implements the abstract methods; the
    mask, observe and live count below are shared. A store never hands out its K/V except through
    `keys_values()` (a dense store's are views, a quantized store's a dequantized transient)."""

    layout = "dense"
    compute = "exact"
    blockwise = False  # attention reads it block by block (`blocks`), not through keys_values()
    ordered = True  # slots of each head are in stream order (LayerView.age_rank may use cumsum)

    def __init__(self, n_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.h, self.d, self.dtype, self.device = n_heads, head_dim, dtype, device
        self.n_live = [0] * n_heads  # host copy of live() (avoids a device sync per check)
        self.recorded: list | None = None  # set to [] to record attention probabilities (profiling)

    def parts(self) -> list[tuple[torch.Tensor | None, Store]]:
        """[(KV heads (Hg,) or None for all, store holding them)]: what attention and eviction loop
        over. One part (this store) unless heads are stored in groups (GroupedKVStore)."""
        return [(None, self)]

    @abstractmethod
    def append(self, k: torch.Tensor, v: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor,
               role: torch.Tensor) -> None:
        """k, v: (H, n, D); seq, pos, role: (n,) shared by all heads."""

    @abstractmethod
    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, C, D) keys and values as attention consumes them."""

    @abstractmethod
    def compact(self, keep: torch.Tensor) -> None:
        """Keep the live slots where keep (H, C) is True; free the others."""

    @abstractmethod
    def nbytes(self) -> int:
        """K/V bytes allocated (what the cache really holds)."""

    @abstractmethod
    def live_bytes(self) -> int:
        """K/V bytes of the live entries."""

    @abstractmethod
    def meta_bytes(self) -> int:
        """Bytes of the per-slot metadata (and any other state the store keeps)."""

    @abstractmethod
    def tokens_within(self, allowance: list[int]) -> list[int]:
        """Per head: the most tokens it can hold in allowance[h] bytes (see engine.budget)."""

    @property
    def new_slots(self) -> torch.Tensor:
        """(H, n) the slots holding the n tokens of the last append (live until the next eviction):
        found by their stream index; stores that know them cheaper override this."""
        m = (self.seq[:, :, None] == self._last_seq[None, None, :]) & self.valid[:, :, None]  # (H, C, n)
        return m.to(torch.int8).argmax(dim=1)

    def mask(self, q_seq: torch.Tensor, q_is_target: torch.Tensor, target_role: int) -> torch.Tensor:
        """(H, n, C) bool, True = visible: live, not later in the stream, and no target key for a
        non-target query (Group Position Encoding)."""
        m = self.valid[:, None, :] & (self.seq[:, None, :] <= q_seq[None, :, None])
        key_is_tgt = (self.role == target_role)[:, None, :]
        return m & (q_is_target[None, :, None] | ~key_is_tgt)

    def observe(self, probs: torch.Tensor) -> None:
        """probs: (H, n, C) attention summed over each KV head's query heads."""
        if self.score is not None:
            self.score += probs.sum(dim=1).float()

    def live(self) -> torch.Tensor:
        return self.valid.sum(dim=1)  # (H,)

    def live_seq(self, h: int) -> list[int]:
        """Stream indices of head h's live entries, oldest first (tests, analysis)."""
        return sorted(self.seq[h][self.valid[h]].tolist())


class KVStore(Store):
    """Dense storage: one (H, cap, D) buffer per layer for keys and one for values (module docstring)."""

    def __init__(self, n_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 track_scores: bool = False, reserve: int = 1, slack: bool = True, inplace: bool = True):
        super().__init__(n_heads, head_dim, dtype, device)
        self.reserve = reserve
        self.slack = slack  # growth slack; off under a budget (and after any eviction): exact growth
        self.inplace = inplace
        self.ordered = True  # until a freed slot is reused
        self._new: tuple | torch.Tensor = (0, 0)  # last append: (first slot, n) at the end, or (H, n) slots
        self._alloc(0, dtype, device, track_scores)

    def _alloc(self, cap: int, dtype, device, track_scores: bool) -> None:
        h, e = self.h, dict(device=device)
        self._k = torch.empty(h, cap, self.d, dtype=dtype, **e)  # (H, cap, D)
        self._v = torch.empty(h, cap, self.d, dtype=dtype, **e)
        self._seq = torch.empty(h, cap, dtype=torch.long, **e)  # (H, cap)
        self._pos = torch.empty(h, cap, dtype=torch.long, **e)
        self._role = torch.empty(h, cap, dtype=torch.int8, **e)
        self._valid = torch.zeros(h, cap, dtype=torch.bool, **e)
        self._score = torch.zeros(h, cap, dtype=torch.float32, **e) if track_scores else None
        self._views(0)

    def _buffers(self) -> list[str]:
        return ["_k", "_v", "_seq", "_pos", "_role", "_valid"] + (["_score"] if self._score is not None else [])

    def _views(self, c: int) -> None:
        """Point the public (H, C, ...) names at the first c slots of the buffers."""
        self.c = c
        self.k, self.v = self._k[:, :c], self._v[:, :c]
        self.seq, self.pos, self.role, self.valid = self._seq[:, :c], self._pos[:, :c], self._role[:, :c], self._valid[:, :c]
        self.score = self._score[:, :c] if self._score is not None else None

    @property
    def capacity(self) -> int:
        return self._k.shape[1]

    # ---- growth and attention inputs -------------------------------------------------------
    def _grow(self, cap: int) -> None:
        """Reallocate the buffers to cap slots (plus slack when unbounded), keeping the first C."""
        cap += grow_slack(cap) if self.slack else 0
        for name in self._buffers():
            old = getattr(self, name)
            new = old.new_zeros((self.h, cap) + old.shape[2:]) if name in ("_valid", "_score") \
                else old.new_empty((self.h, cap) + old.shape[2:])
            new[:, : self.c] = old[:, : self.c]
            setattr(self, name, new)

    def append(self, k: torch.Tensor, v: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor,
               role: torch.Tensor) -> None:
        """k, v: (H, n, D); seq, pos, role: (n,) shared by all heads."""
        n, c = k.shape[1], self.c
        # per head: free slots among the C in use (host counts); a compacting store pads, never reuses
        free = [c - x for x in self.n_live] if self.inplace else [0] * self.h
        top = c + max((max(n - f, 0) for f in free), default=n)
        grew = top > self.capacity
        if grew:
            self._grow(top)
        if max(free, default=0) == 0:  # no free slot anywhere: write at the end, in stream order
            s = slice(c, c + n)
            self._k[:, s], self._v[:, s] = k, v
            self._seq[:, s], self._pos[:, s], self._role[:, s] = seq, pos, role
            self._valid[:, s] = True
            if self._score is not None:
                self._score[:, s] = 0.0
            self._new = (c, n)
        else:  # each head's free slots first (lowest first), then slots past C
            if n == 1 and min(free) > 0:  # one token, a free slot in every head: the lowest (argmin: the first)
                idx = self._valid[:, :c].to(torch.int8).argmin(dim=1, keepdim=True)  # (H, 1)
            else:
                ext = self._valid[:, : c + n].clone()
                ext[:, c:] = False
                idx = torch.argsort(ext.to(torch.int8), dim=1, stable=True)[:, :n]  # (H, n)
            e = idx[..., None].expand(-1, -1, self.d)
            self._k.scatter_(1, e, k.to(self._k.dtype))
            self._v.scatter_(1, e, v.to(self._v.dtype))
            for buf, x in ((self._seq, seq), (self._pos, pos), (self._role, role.to(torch.int8))):
                buf.scatter_(1, idx, x.expand(self.h, n))
            self._valid.scatter_(1, idx, True)
            if self._score is not None:
                self._score.scatter_(1, idx, 0.0)
            self._new = idx
            self.ordered = False
        self._last_seq = seq
        self.n_live = [x + n for x in self.n_live]
        if grew or top != c:  # (at budget, writing into freed slots: the views still hold)
            self._views(top)

    @property
    def new_slots(self) -> torch.Tensor:
        if isinstance(self._new, torch.Tensor):
            return self._new
        c, n = self._new
        return torch.arange(c, c + n, device=self._k.device).expand(self.h, n)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, C, D) keys and values as attention consumes them."""
        return self.k, self.v

    # ---- eviction ------------------------------------------------------------------------
    def compact(self, keep: torch.Tensor) -> None:
        """Keep the slots where keep (H, C) is True. In place: the others become free slots (their
        bytes are reused by the next append). Compacting (`inplace=False`): the survivors, in their
        current order, move to a new buffer of (largest head's count + reserve) slots; the old
        buffer (and the evicted slots) is freed."""
        keep = keep & self.valid
        self.slack = False
        if self.inplace:
            self._valid[:, : self.c] = keep
            self.n_live = keep.sum(dim=1).tolist()
            return
        counts = keep.sum(dim=1)
        self.n_live = counts.tolist()
        c = max(self.n_live) if self.n_live else 0
        if min(self.n_live, default=0) == c:  # every head keeps c: stream order is nonzero's order
            order = keep.nonzero()[:, 1].view(self.h, c)
        else:
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :c]  # (H, c)
        cap = c + self.reserve
        for name in self._buffers():
            old = getattr(self, name)[:, : self.c]
            new = old.new_empty((self.h, cap) + old.shape[2:])
            if name == "_valid":
                new.zero_()
                new[:, :c] = torch.arange(c, device=keep.device)[None, :] < counts[:, None]
            else:
                idx = order if old.dim() == 2 else order[..., None].expand(-1, -1, self.d)
                torch.gather(old, 1, idx, out=new[:, :c])
                if name == "_score":
                    new[:, c:] = 0.0
            setattr(self, name, new)
        self._views(c)

    def set_keys(self, k: torch.Tensor) -> None:
        """Replace the keys of the C slots in use, in place (the engine no longer re-rotates stored
        keys; kept for bench/positions.py's reproduction of the old engine)."""
        self._k[:, : self.c] = k

    def set_pos(self, pos: torch.Tensor) -> None:
        self._pos[:, : self.c] = pos

    # ---- accounting ----------------------------------------------------------------------
    def nbytes(self) -> int:
        """K/V bytes allocated: every slot of the buffers, spare slots and padding included."""
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    def live_bytes(self) -> int:
        return sum(self.n_live) * self.d * 2 * self._k.element_size()

    def meta_bytes(self) -> int:
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._buffers()[2:])

    def tokens_within(self, allowance: list[int]) -> list[int]:
        per_token = 2 * self.d * self._k.element_size()
        return [a // per_token for a in allowance]


class HeadGroups:
    """Per-head budgets without padding: the KV heads of one layer grouped by budget, each group a
    dense KVStore of its own, (H_g, B_g + 1, D), so the layer allocates sum_g H_g x (B_g + 1) slots (the
    budgets plus one reserve slot per head) where one padded buffer would hold H x (max B + 1).
    Not a Store: attention and eviction run group by group over `parts()`, as they run over the one
    part of a plain store; what is per head (n_live, bytes) reads in head order."""

    layout = "grouped_per_head"

    def __init__(self, n_heads: int, head_dim: int, dtype, device, groups: list[list[int]], **kw):
        if sorted(h for g in groups for h in g) != list(range(n_heads)):
            raise ValueError(f"groups {groups} do not partition {n_heads} heads")
        self.h, self.d, self.dtype, self.device = n_heads, head_dim, dtype, device
        self.recorded = None
        self._parts = [(torch.tensor(g, device=device), KVStore(len(g), head_dim, dtype, device, **kw))
                       for g in groups]
        self._where = [next((pi, g.index(h)) for pi, g in enumerate(groups) if h in g) for h in range(n_heads)]
        self._groups, self._qheads = [list(g) for g in groups], {}

    def parts(self) -> list[tuple[torch.Tensor, KVStore]]:
        return self._parts

    def query_heads(self, g: int) -> list[slice | torch.Tensor]:
        """Per part, its query heads (g per KV head, KV head h serving query heads h*g..h*g+g-1): a
        slice when the part's KV heads are consecutive (views, no gather), else an index tensor. Cached."""
        if g not in self._qheads:
            out = []
            for heads in self._groups:
                if heads == list(range(heads[0], heads[0] + len(heads))):
                    out.append(slice(heads[0] * g, (heads[0] + len(heads)) * g))
                else:
                    out.append(torch.tensor([h * g + i for h in heads for i in range(g)], device=self.device))
            self._qheads[g] = out
        return self._qheads[g]

    @property
    def n_live(self) -> list[int]:
        return [self._parts[pi][1].n_live[j] for pi, j in self._where]

    def live(self) -> torch.Tensor:
        return torch.tensor(self.n_live, device=self.device)  # (H,)

    def live_seq(self, h: int) -> list[int]:
        pi, j = self._where[h]
        return self._parts[pi][1].live_seq(j)

    def append(self, k, v, seq, pos, role) -> None:
        for (_, p), kh in zip(self._parts, self.query_heads(1)):  # g = 1: the KV heads themselves
            p.append(k[kh], v[kh], seq, pos, role)

    def nbytes(self) -> int:
        return sum(p.nbytes() for _, p in self._parts)

    def live_bytes(self) -> int:
        return sum(p.live_bytes() for _, p in self._parts)

    def meta_bytes(self) -> int:
        return sum(p.meta_bytes() for _, p in self._parts)

    def tokens_within(self, allowance: list[int]) -> list[int]:
        return self._parts[0][1].tokens_within(allowance)
