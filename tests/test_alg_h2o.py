"""H2O pinned on planted attention: scores are accumulated attention, and the kept set follows them.

Tensor level (no model): one layer's store is driven through the engine's own attention function
(`hf.kvbench_attention`, the path H2O's scores come from in a real run) with planted queries and keys:
every query of a KV head's group attends to that query head's own "heavy" keys, which sit in the middle
of the stream (neither the oldest nor the newest tokens), and the two query heads of a group prefer
different heavy keys. A float64 brute force from explicit softmax probabilities gives the reference
scores and the reference kept set after every prefill chunk and decode step.

    python -m pytest -q tests/test_alg_h2o.py
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvbench.engine import hf
from kvbench.engine.qstore import QuantKVStore
from kvbench.engine.store import KVStore
from kvbench.methods import method_from_config
from kvbench.methods.base import LayerView

HKV, G, D = 2, 2, 16  # KV heads, query heads per KV head, head dim
CPU = torch.device("cpu")
# per KV head, per query head of its group: the stream indices of that query head's heavy hitters. The
# first ones come early (before them the first queries spread their mass over the oldest tokens, which
# therefore start with real scores), the second ones in the middle of the second prefill chunk
HEAVY = {0: ([3, 13], [4, 16]), 1: ([2, 14], [5, 17])}
CHUNKS = [12, 18] + [1] * 24  # two prefill chunks, then decode steps


def planted_chunk(seq: torch.Tensor, gen: torch.Generator):
    """q (1, Hq, n, D), k and v (1, Hkv, n, D) for the tokens `seq`: query head g of every group looks
    along basis direction g; a key is heavy for query head g when it lies along g, ordinary keys point
    away from both. q.k: ~7.5 for a heavy key, ~-3 for an ordinary one (scale 1)."""
    n = len(seq)
    noise = lambda *s: 0.2 * torch.randn(*s, generator=gen)  # noqa: E731
    q = noise(1, HKV * G, n, D)
    k = noise(1, HKV, n, D)
    v = torch.randn(1, HKV, n, D, generator=gen)
    for h in range(HKV):
        for g in range(G):
            q[0, h * G + g, :, g] += 3.0
        k[0, h, :, :G] -= 1.0
        for g, heavy in enumerate(HEAVY[h]):
            for i, s in enumerate(seq.tolist()):
                if s in heavy:
                    k[0, h, i, :G] = 0.0
                    k[0, h, i, g] = 2.5
    return q, k, v


class Reference:
    """Brute force of H2O on one KV head: live keys {seq: key (D,) float64} and scores {seq: float}."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.score: dict[int, float] = {}

    def attend(self, q: torch.Tensor, k: torch.Tensor, seq: list[int]) -> None:
        """q (G, n, D): every query head of the group, every query of the chunk; k (n, D)."""
        for i, s in enumerate(seq):
            self.keys[s] = k[i].double()
            self.score[s] = 0.0
        for g in range(q.shape[0]):
            for i, s in enumerate(seq):
                vis = sorted(j for j in self.keys if j <= s)
                p = torch.softmax(torch.stack([self.keys[j] for j in vis]) @ q[g, i].double(), dim=0)
                for j, pj in zip(vis, p.tolist()):
                    self.score[j] += pj

    def evict(self, budget: int, recent_ratio: float) -> None:
        live = sorted(self.keys)
        if len(live) <= budget:
            return
        n_recent = int(budget * recent_ratio)
        recent = live[len(live) - n_recent:]
        older = sorted(live[: len(live) - n_recent], key=lambda s: (-self.score[s], s))
        keep = set(recent) | set(older[: budget - n_recent])
        self.keys = {s: k for s, k in self.keys.items() if s in keep}
        self.score = {s: x for s, x in self.score.items() if s in keep}


def make_store(kind: str):
    if kind == "dense":
        return KVStore(HKV, D, torch.float32, CPU, track_scores=True)
    # 16 bits: stored exactly, so attention and scores equal the dense store's; the packed store keeps its
    # own slot order (tiers) and regathers scores on every flush and eviction
    return QuantKVStore(HKV, D, torch.float32, CPU, [16] * HKV, [16] * HKV, group_size=4, residual=3,
                        track_scores=True)


def run_h2o(kind: str, budget: int = 8, recent_ratio: float = 0.5, check_scores: bool = True):
    """Drive the store chunk by chunk; after each step compare scores and kept sets with the brute force.
    Returns the reference (its final kept set) and the store."""
    gen = torch.Generator().manual_seed(0)
    store = make_store(kind)
    cache = hf.StoreCache([store])
    module = SimpleNamespace(layer_idx=0, scaling=1.0)
    method = method_from_config("h2o", {"recent_ratio": recent_ratio})
    refs = [Reference() for _ in range(HKV)]
    s0 = 0
    for step, n in enumerate(CHUNKS):
        seq = torch.arange(s0, s0 + n)
        q, k, v = planted_chunk(seq, gen)
        cache.pending = (seq, seq, torch.ones(n, dtype=torch.long))
        K, V = cache.layers[0].update(k, v)
        hf.kvbench_attention(module, q, K, V, None, kvbench_cache=cache)
        for h in range(HKV):
            refs[h].attend(q[0, h * G:(h + 1) * G], k[0, h], seq.tolist())
        s0 += n
        where = f"{kind} store, step {step} (after token {s0 - 1})"
        if check_scores:
            for h in range(HKV):
                got = {int(s): float(x) for s, x, ok in zip(store.seq[h], store.score[h], store.valid[h]) if ok}
                want = refs[h].score
                assert sorted(got) == sorted(want), where
                for s in want:
                    assert got[s] == pytest.approx(want[s], rel=1e-4, abs=1e-5), f"{where}: head {h}, token {s}"
        budgets = torch.full((HKV,), budget)
        if bool((store.live() > budgets).any()):
            view = LayerView(store.seq, store.pos, store.role, store.valid, store.score, layer=0,
                             ordered=store.ordered)
            store.compact(method.select(view, budgets))
        for h in range(HKV):
            refs[h].evict(budget, recent_ratio)
            assert sorted(store.seq[h][store.valid[h]].tolist()) == sorted(refs[h].keys), f"{where}: head {h}"
    return refs, store


@pytest.mark.parametrize("kind", ["dense", "quant16"])
def test_h2o_scores_and_kept_set_equal_bruteforce(kind):
    """Scores == accumulated explicit probabilities (every query of every prefill chunk and decode step,
    summed over the KV head's query heads) and the kept set == the brute force, at every step."""
    run_h2o(kind)


def test_h2o_keeps_the_planted_heavy_hitters_not_the_oldest():
    """The kept set follows attention, not age: at the end each head keeps its 4 heavy hitters (both query
    heads' ones: GQA sums the group) plus the 4 most recent tokens; the two oldest tokens, which the first
    queries attended to, are gone."""
    refs, store = run_h2o("dense", check_scores=False)
    n = sum(CHUNKS)
    for h in range(HKV):
        kept = sorted(store.seq[h][store.valid[h]].tolist())
        heavy = sorted(HEAVY[h][0] + HEAVY[h][1])
        assert kept == heavy + list(range(n - 4, n)), f"head {h}"
        assert not set(kept) & {0, 1}


def test_scores_sum_every_query_head_and_every_query():
    """One prefill chunk, no eviction: a KV head's score is the sum over its query heads and over all the
    chunk's queries of the explicit attention; then one decode step adds exactly its own row."""
    gen = torch.Generator().manual_seed(1)
    store = KVStore(HKV, D, torch.float32, CPU, track_scores=True)
    cache = hf.StoreCache([store])
    module = SimpleNamespace(layer_idx=0, scaling=1.0)
    keys = []
    expected = torch.zeros(HKV, 0, dtype=torch.float64)
    for seq in (torch.arange(0, 6), torch.arange(6, 7)):
        q, k, v = torch.randn(1, HKV * G, len(seq), D, generator=gen), torch.randn(1, HKV, len(seq), D, generator=gen), \
            torch.randn(1, HKV, len(seq), D, generator=gen)
        cache.pending = (seq, seq, torch.ones(len(seq), dtype=torch.long))
        K, V = cache.layers[0].update(k, v)
        hf.kvbench_attention(module, q, K, V, None, kvbench_cache=cache)
        keys.append(k[0].double())
        allk = torch.cat(keys, dim=1)  # (Hkv, T, D)
        t = allk.shape[1]
        expected = torch.cat([expected, torch.zeros(HKV, len(seq), dtype=torch.float64)], dim=1)
        for h in range(HKV):
            for g in range(G):
                logits = q[0, h * G + g].double() @ allk[h].T  # (n, T)
                causal = seq[:, None] >= torch.arange(t)[None, :]
                p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
                expected[h] += p.sum(0)
        assert torch.allclose(store.score.double(), expected, rtol=1e-5, atol=1e-6), (seq, store.score, expected)
    # the per-query-head parts differ, so a sum over one query head (or one query) cannot pass above
    assert store.score.shape == (HKV, 7)


def test_h2o_select_fills_the_budget_from_older_tokens():
    """select() on constructed scores: the recent window and the heavy hitters are disjoint, so the kept set
    always has exactly `budget` tokens, even when the recent tokens have the highest scores; among equal
    scores the older token wins (per head, budgets may differ)."""
    c = 12
    seq = torch.arange(c).expand(2, c)
    rising = torch.arange(c, dtype=torch.float32)  # head 0: newer = more attention
    flat = torch.ones(c)  # head 1: all equal
    view = LayerView(seq, seq, torch.ones(2, c, dtype=torch.long), torch.ones(2, c, dtype=torch.bool),
                     torch.stack([rising, flat]), layer=0, ordered=True)
    keep = method_from_config("h2o", {"recent_ratio": 0.5}).select(view, torch.tensor([6, 4]))
    assert keep[0].nonzero().flatten().tolist() == [6, 7, 8, 9, 10, 11]  # recent 9-11 + the best older 6-8
    assert keep[1].nonzero().flatten().tolist() == [0, 1, 10, 11]  # recent 10-11 + the two oldest of the ties


def test_h2o_select_unordered_slots_keeps_the_same_tokens():
    """The same rule on a store whose slots are out of stream order (a quantized store's tiers, freed
    slots reused) with invalid slots among them: the kept tokens are the ones the ordered store keeps,
    ties included (the older token wins, by stream index, not by slot)."""
    c = 12
    perm = torch.tensor([5, 11, 0, 7, 2, 9, 1, 10, 3, 8, 4, 6])  # slot -> stream index
    seq = torch.cat([perm, torch.zeros(2, dtype=torch.long)]).expand(2, c + 2)  # two padding slots
    valid = torch.ones(2, c + 2, dtype=torch.bool)
    valid[:, c:] = False
    rising = torch.cat([perm.float(), torch.zeros(2)])  # head 0: newer = more attention
    flat = torch.cat([torch.ones(c), torch.full((2,), 5.0)])  # head 1: all equal (padding: stale high scores)
    view = LayerView(seq, seq, torch.ones(2, c + 2, dtype=torch.long), valid, torch.stack([rising, flat]),
                     layer=0, ordered=False)
    keep = method_from_config("h2o", {"recent_ratio": 0.5}).select(view, torch.tensor([6, 4]))
    assert not keep[:, c:].any()
    assert sorted(seq[0][keep[0]].tolist()) == [6, 7, 8, 9, 10, 11]
    assert sorted(seq[1][keep[1]].tolist()) == [0, 1, 10, 11]  # the two oldest of the ties, wherever they sit
