"""Budgets in bytes and tokens: the one place the engine converts between them.

A budget B (DESIGN.md "Budget semantics") is B full-precision tokens per (layer, KV head): every head
may allocate B x `token_bytes` bytes, K and V at the cache dtype. A dense store holds B tokens in
that allowance; a quantized store holds as many as its worst-case bytes allow (`qstore.bytes_bound`),
so a 2-bit head keeps several times more tokens than an 8-bit one at the same budget.
"""

from __future__ import annotations

import torch


def token_bytes(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one full-precision token of one KV head: its key and its value."""
    return 2 * head_dim * torch.empty(0, dtype=dtype).element_size()


def budget_bytes(budget: int | None, geom: dict, dtype: torch.dtype) -> int | None:
    """The whole cache's allowance at budget B: every layer and KV head, None for the full cache."""
    if budget is None:
        return None
    return budget * geom["n_layers"] * geom["n_kv_heads"] * token_bytes(geom["head_dim"], dtype)


def tokens_per_head(store, allowance: torch.Tensor) -> torch.Tensor:
    """(H,) tokens each head of `store` may keep within allowance (H,) full-precision tokens."""
    per_token = token_bytes(store.d, store.dtype)
    tokens = store.tokens_within([int(a) * per_token for a in allowance.tolist()])
    return torch.tensor(tokens, dtype=torch.long, device=allowance.device)
