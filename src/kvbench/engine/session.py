"""A decoding session: one model, one method, one budget, one stream of tokens.

`Session.feed(ids, pos, role)` runs new tokens through the model in forwards of up to `chunk_size`.
Budget (DESIGN.md "Budget semantics"): under a budget B, a query never sees more than B cached
entries per (layer, KV head) plus itself, whatever is fed (instruction, source, target, a document
scored for perplexity). A chunk in which no head would pass its budget runs as usual (append all,
attend, evict after the forward: nothing is evicted inside it, so this is exact). A chunk in which a
head would pass its budget runs *stepwise*: the model still computes projections and MLPs for the n
tokens at once, but in every layer the attention function appends token i, attends its query and
has the session evict that layer back to its budget before token i + 1 (hf.StoreCache.stepwise) --
exactly what n one-token forwards compute, layer by layer, at about half their cost. (`stepwise =
False` gives the one-token forwards.) So the cache holds at most B + 1 entries per head (B + the
token being written; quantized methods: their byte allowance) at any time, and a perplexity scored
through `feed` in chunks equals the same document scored token by token. The K/V of a stepwise
chunk's tokens not yet appended are a transient of the forward (at most chunk_size tokens per layer,
as in any prefill chunk), not cache. Without a budget (the full cache) chunks are plain.

Memory is measured here, from the tensors the stores hold, after every forward (peak, before
eviction) and after every eviction (the steady state); a stepwise chunk contributes one snapshot
per token, summed over layers. Nothing in here branches on a method's name:
it reads the method's flags (and its optional `position_rule`, see kvbench.streams.PositionRule).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..streams import ROLE_TARGET, PositionRule, reindexed_positions
from ..methods.base import LayerView, Method
from . import hf
from .budget import budget_bytes, tokens_per_head
from .qstore import QuantKVStore, SinkOutlierFlags
from .store import HeadGroups, KVStore, Store


@dataclass
class MemoryStats:
    steps: int = 0
    bytes_peak: int = 0
    live_bytes_peak: int = 0
    meta_bytes_peak: int = 0
    bytes_sum: float = 0.0
    retained_peak: float = 0.0
    retained_sum: float = 0.0
    after_step_bytes: list[int] = field(default_factory=list)

    def observe(self, stores, after_step: bool) -> None:
        """Bytes from the stores' allocations and host-side live counts: no device work."""
        self.observe_totals([layer_stats(s) for s in stores], after_step)

    def observe_totals(self, per_layer: list[tuple], after_step: bool) -> None:
        """Same, from per-layer (bytes, live bytes, metadata bytes, mean live tokens) snapshots."""
        b, live, meta, tokens = (sum(x) for x in zip(*per_layer))
        self.bytes_peak = max(self.bytes_peak, b)
        self.live_bytes_peak = max(self.live_bytes_peak, live)
        self.meta_bytes_peak = max(self.meta_bytes_peak, meta)
        retained = tokens / len(per_layer)
        self.retained_peak = max(self.retained_peak, retained)
        if after_step:
            self.steps += 1
            self.bytes_sum += b
            self.retained_sum += retained
            self.after_step_bytes.append(b)

    def row(self) -> dict:
        n = max(self.steps, 1)
        return dict(
            cache_bytes_peak=self.bytes_peak, cache_bytes_mean=self.bytes_sum / n,
            cache_bytes_live_peak=self.live_bytes_peak, metadata_bytes_peak=self.meta_bytes_peak,
            retained_tokens_peak=round(self.retained_peak), retained_tokens_mean=self.retained_sum / n,
        )


def layer_stats(s) -> tuple:
    return s.nbytes(), s.live_bytes(), s.meta_bytes(), sum(s.n_live) / len(s.n_live)


def make_store(method: Method, geom: dict, dtype, device, layer: int, types: list[str] | None = None,
               budgets: list[int] | None = None, inplace: bool = True) -> Store | HeadGroups:
    """The store the method declares for `layer` (types: its profiled head types; budgets: the
    layer's per-head token budgets, None without a budget: dense buffers then grow with slack);
    inplace: dense eviction frees slots for reuse (False: the compacting reference, see engine.store).
    A method whose heads hold different budgets gets its heads grouped by budget (HeadGroups)."""
    h, d = geom["n_kv_heads"], geom["head_dim"]
    bounded = budgets is not None
    if method.layout == "grouped_per_head" and bounded and len(set(budgets)) > 1:
        groups = [[i for i, b in enumerate(budgets) if b == v] for v in sorted(set(budgets))]
        return HeadGroups(h, d, dtype, device, groups, track_scores=method.needs_scores, slack=False, inplace=inplace)
    if method.storage == "dense":
        store = KVStore(h, d, dtype, device, track_scores=method.needs_scores, slack=not bounded, inplace=inplace)
        store.layout = method.layout
        return store
    spec = method.quant_spec(layer, h, types)
    if spec.group_size < d and d % spec.group_size:  # value rows in groups of min(G, D) channels
        raise ValueError(f"{method.type_name}: group_size {spec.group_size} does not divide head_dim {d} (value "
                         f"rows are quantized in groups of min(group_size, head_dim) channels)")
    r = spec.hi_rule
    flagger = SinkOutlierFlags(r.n_sink, r.decay, r.threshold, r.detect) if r is not None else None
    return QuantKVStore(h, d, dtype, device, list(spec.key_bits), list(spec.value_bits), spec.group_size,
                        spec.residual, track_scores=method.needs_scores, hi_bits=spec.hi_bits, max_hi=spec.max_hi,
                        flagger=flagger)


def _rows(x, heads):
    """The entries of KV heads `heads` (None: all) of a per-head tensor or of a dict of them."""
    if x is None or heads is None:
        return x
    return {n: m[heads] for n, m in x.items()} if isinstance(x, dict) else x[heads]


class Session:
    stepwise = True  # evicting chunks run stepwise inside one forward (False: one-token forwards)
    inplace = True  # dense stores evict in place (False: the compacting reference store)
    batched = True  # rowwise rules select for all layers at once after a plain forward (False: layer by layer)

    def __init__(self, model, method: Method, budget: int | None, chunk_size: int = 64, profile=None,
                 validated: bool = False):
        """validated: the caller already ran method.validate(budget) (an eval job does, once)."""
        hf.prepare_model(model)
        self.model, self.method, self.chunk_size = model, method, chunk_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.geom = hf.model_geometry(model)
        if not validated:
            method.validate(budget)
        types = list(profile.types) if profile is not None else [None] * self.geom["n_layers"]
        self.budgets = None  # (L, H) full-precision tokens per layer and KV head (the byte allowance)
        self.keep = None  # (L, H) tokens each head may keep within it (its storage's conversion)
        if method.evicts and budget is not None:
            self.budgets = method.head_budgets(budget, self.geom["n_layers"], self.geom["n_kv_heads"], profile)
            self.budgets = self.budgets.to(self.device)
            self._budgets_host = self.budgets.tolist()
        self.stores = [make_store(method, self.geom, self.dtype, self.device, i, types[i],
                                  self._budgets_host[i] if self.budgets is not None else None, self.inplace)
                       for i in range(self.geom["n_layers"])]
        if self.budgets is not None:
            self.keep = torch.stack([tokens_per_head(st, b) for st, b in zip(self.stores, self.budgets)])
        masks = [None if t is None else {n: torch.tensor([x == n for x in t], device=self.device) for n in set(t)}
                 for t in types]
        # per layer, per part of its store: (part, the part's keep budgets, its heads' type masks and names)
        self._parts = [[(p, _rows(self.keep[i] if self.keep is not None else None, heads), _rows(masks[i], heads),
                         None if types[i] is None else tuple(types[i][h] for h in
                                                             (range(p.h) if heads is None else heads.tolist())))
                        for heads, p in st.parts()] for i, st in enumerate(self.stores)]
        self.cache = hf.StoreCache(self.stores, model)
        self.seq = 0
        # re-indexed positions (StreamingLLM): declared by the method as a streams.PositionRule
        self.rule: PositionRule | None = getattr(method, "position_rule", None)
        self.first: dict = {}  # ("all" | "nonsink", is_target) -> original position of the group's first token
        if self.rule is not None:
            if method.storage != "dense":
                raise ValueError(f"{method.type_name}: re-indexed positions need dense storage")
            hf.check_reindexable(model)
            self.max_lead = self.rule.max_lead if self.rule.max_lead is not None else \
                (int(self.budgets.max()) if self.budgets is not None else 0)
            self.cache.positioner = self._positions
        self._selected: dict = {}
        self._stacks: dict = {}
        self.memory = MemoryStats()
        self.tokens = 0
        self._max_fed = -1

    @property
    def max_position(self) -> int:
        """The largest RoPE position any query or key has been given so far: the positions fed, or,
        under re-indexed positions, the largest one attention rotated to (bounded by the rule)."""
        return self.cache.max_position if self.rule is not None else self._max_fed

    def positions_of(self, store) -> torch.Tensor:
        """(H, C) the positions attention gives the store's entries now (tests, analysis)."""
        return self._positions(store) if self.rule is not None else store.pos

    # ---- positions -----------------------------------------------------------------------
    def _note_firsts(self, seq: list[int], pos: list[int], is_tgt: list[bool]) -> None:
        for s, p, g in zip(seq, pos, is_tgt):
            self.first.setdefault(("all", g), p)
            if s >= self.rule.n_sink:
                self.first.setdefault(("nonsink", g), p)

    def _positions(self, store) -> torch.Tensor:
        """(H, C) positions attention applies to the store's unrotated keys (and, for the last n
        slots, the new tokens' queries) in this forward."""
        return reindexed_positions(self.rule, store.pos, store.seq, store.role, store.valid, self.first,
                                   self.max_lead, store.ordered)

    # ---- feeding -------------------------------------------------------------------------
    @torch.inference_mode()
    def feed(self, ids, pos, role, logits: str = "last") -> torch.Tensor:
        """ids, pos, role: (n,) tensors or lists. Returns logits (n, V) or (1, V) of the last."""
        ids, pos, role = (torch.as_tensor(x, dtype=torch.long, device=self.device) for x in (ids, pos, role))
        outs, a = [], 0
        while a < ids.shape[0]:
            n, stepwise = self._chunk(ids.shape[0] - a)
            b = a + n
            c_pos, c_role = pos[a:b], role[a:b]
            seq = torch.arange(self.seq, self.seq + b - a, device=self.device)
            self.cache.pending = (seq, c_pos, c_role)  # the store keeps original positions
            self.cache.pending_target = (self.cache.pending, (c_role == ROLE_TARGET).tolist())
            self.cache._tables = {}  # rotation tables are shared by layers within one forward only
            self._selected = {}  # token of the forward -> its first layer's selection (entries_only rules)
            if stepwise:
                self.cache.stepwise = self
                self._steps = [[None] * n for _ in range(2 * len(self.stores))]
            model_pos = c_pos
            if self.rule is None:
                self._max_fed = max(self._max_fed, int(c_pos.max()))
            else:  # RoPE at position 0 is the identity: unrotated q and k
                if len(self.first) < 4:
                    self._note_firsts(list(range(self.seq, self.seq + b - a)), c_pos.tolist(),
                                      self.cache.pending_target[1])
                model_pos = torch.zeros_like(c_pos)
            last = logits == "last" and b == ids.shape[0]
            try:
                out = hf.forward(self.model, ids[a:b], model_pos, self.cache, "last" if last or logits == "last" else "all")
            finally:
                self.cache.stepwise = None
            if logits == "all" or last:
                outs.append(out)
            self.seq += b - a
            self.tokens += b - a
            if stepwise:  # per-token memory snapshots, summed over layers as n one-token forwards see them
                nl = len(self.stores)
                for i in range(n):
                    self.memory.observe_totals([self._steps[li][i] for li in range(nl)], after_step=False)
                    self.memory.observe_totals([self._steps[nl + li][i] for li in range(nl)], after_step=True)
            else:
                self.memory.observe(self.stores, after_step=False)
                self._evict()
                self.memory.observe(self.stores, after_step=True)
            a = b
        return torch.cat(outs) if logits == "all" else outs[-1]

    def _chunk(self, left: int) -> tuple[int, bool]:
        """(tokens for the next forward, stepwise). Up to chunk_size tokens; when a head would pass
        its budget inside them, they run stepwise (appended, attended and evicted one at a time in
        every layer: exact), or, with `stepwise` off, as one-token forwards (host counts: no sync)."""
        n = min(self.chunk_size, left)
        if self.budgets is None:
            return n, False
        room = min(b - x for s, bs in zip(self.stores, self._budgets_host) for x, b in zip(s.n_live, bs))
        if n <= room:
            return n, False
        if self.stepwise and n > 1:
            return n, True
        return max(1, min(n, room)), False

    def _evict(self) -> None:
        """Evict every layer over its budget after a plain forward. Under a `rowwise` rule, the parts
        of all such layers that have the same shape (slots in use, slot order, scores) are stacked
        head over head and selected in one call (what a rule costs is mostly per call, not per row);
        the mask of each row is what selecting its layer alone gives (`tests/test_inplace.py`)."""
        if self.budgets is None:
            return
        todo = [i for i in range(len(self.stores)) if self._over(i)]
        if not (self.batched and self.method.rowwise and len(todo) > 1):
            for i in todo:
                self._evict_layer(i)
            return
        groups: dict = {}
        for i in todo:
            for j, (p, *_) in enumerate(self._parts[i]):
                groups.setdefault((p.seq.shape[1], p.ordered, p.score is not None), []).append((i, j))
        for items in groups.values():
            if len(items) == 1:
                i, j = items[0]
                p, keep, types, kinds = self._parts[i][j]
                p.compact(self._select(i, p, keep, types, kinds))
                continue
            ps = [self._parts[i][j][0] for i, j in items]
            keep, types, kinds = self._stacked(tuple(items))
            cat = [torch.cat([getattr(p, n) for p in ps]) for n in ("seq", "pos", "role", "valid")]
            score = torch.cat([p.score for p in ps]) if ps[0].score is not None else None
            mask = self.method.select(LayerView(*cat, score, ordered=ps[0].ordered, types=types, kinds=kinds), keep)
            row = 0
            for p in ps:
                p.compact(mask[row:row + p.h])
                row += p.h

    def _stacked(self, items: tuple) -> tuple:
        """Budgets, type masks and type names of the parts `items` ((layer, part) pairs), stacked in
        that order (cached: the parts and their budgets never change)."""
        got = self._stacks.get(items)
        if got is None:
            parts = [self._parts[i][j] for i, j in items]
            keep = torch.cat([k for _, k, _, _ in parts])
            types = kinds = None
            if all(t is not None for _, _, t, _ in parts):
                names = sorted({n for _, _, t, _ in parts for n in t})
                types = {n: torch.cat([t[n] if n in t else p.valid.new_zeros(p.h) for p, _, t, _ in parts])
                         for n in names}
                kinds = tuple(x for *_, k in parts for x in k)
            got = self._stacks[items] = (keep, types, kinds)
        return got

    def _over(self, i: int) -> bool:
        return any(n > b for n, b in zip(self.stores[i].n_live, self._budgets_host[i]))  # host counts: no sync

    def _evict_layer(self, i: int, step: int = 0) -> None:
        if self._over(i):
            for p, keep, types, kinds in self._parts[i]:  # one part, or one per head group
                p.compact(self._select(i, p, keep, types, kinds, step))

    def _select(self, i: int, p, keep, types, kinds, step: int = 0) -> torch.Tensor:
        """The method's keep mask for part p of layer i. A rule that reads only the entries
        (`Method.entries_only`: seq, pos, role, valid, slot order, budgets) keeps the same slots in
        every layer holding the same entries under the same budgets, which is every layer under such
        a rule: the first layer of a token's eviction selects, the next ones reuse its mask when their
        (seq, valid, order, budgets) equal its snapshot (checked, never assumed)."""
        view = LayerView(p.seq, p.pos, p.role, p.valid, p.score, layer=i, ordered=p.ordered, types=types,
                         kinds=kinds)
        if not self.method.entries_only:
            return self.method.select(view, keep)
        memo = self._selected.get(step)
        if memo is not None and memo[2] == p.ordered and torch.equal(memo[3], keep) and hf.same_entries(memo, p):
            return memo[4]
        mask = self.method.select(view, keep)
        self._selected[step] = (*hf.entries_snapshot(p), p.ordered, keep, mask)
        return mask

    # ---- stepwise forwards (called by hf.kvbench_attention, layer by layer) --------------------
    def step_append(self, layer: int, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append token i of this forward to `layer`'s store: k, v (H, 1, D)."""
        seq, pos, role = self.cache.pending
        s = self.stores[layer]
        s.append(k, v, seq[i:i + 1], pos[i:i + 1], role[i:i + 1])
        self._steps[layer][i] = layer_stats(s)

    def step_evict(self, layer: int, i: int) -> None:
        self._evict_layer(layer, i)
        self._steps[len(self.stores) + layer][i] = layer_stats(self.stores[layer])

    def budget_bytes(self, budget: int | None) -> int | None:
        return budget_bytes(budget, self.geom, self.dtype)

    def layout(self) -> str:
        return self.stores[0].layout

    def compute(self) -> str:
        return self.stores[0].parts()[0][1].compute
