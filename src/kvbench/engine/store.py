"""Per-layer KV storage with real eviction and per-head ragged lengths (no transformers import).

Layout: one padded buffer per layer, (H, C, D) for keys and values, H = KV heads, C = slots. Each
slot carries metadata beside the tensors: `seq` (stream order, drives causality), `pos` (the RoPE
position the key was rotated with), `role` (instruction / source / target), `valid`, and optionally
`score` (accumulated attention, for H2O-like rules). Heads may hold different numbers of live
entries (head-aware budgets); compaction reallocates the buffer to the largest head's count, so
the bytes reported are the bytes really allocated, padding included.
"""

from __future__ import annotations

import torch


class KVStore:
    layout = "dense"
    compute = "exact"

    def __init__(self, n_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 track_scores: bool = False):
        self.h, self.d = n_heads, head_dim
        e = dict(device=device)
        self.k = torch.empty(n_heads, 0, head_dim, dtype=dtype, **e)  # (H, C, D)
        self.v = torch.empty(n_heads, 0, head_dim, dtype=dtype, **e)
        self.seq = torch.empty(n_heads, 0, dtype=torch.long, **e)  # (H, C)
        self.pos = torch.empty(n_heads, 0, dtype=torch.long, **e)
        self.role = torch.empty(n_heads, 0, dtype=torch.int8, **e)
        self.valid = torch.empty(n_heads, 0, dtype=torch.bool, **e)
        self.score = torch.empty(n_heads, 0, dtype=torch.float32, **e) if track_scores else None
        self.recorded: list | None = None  # set to [] to record attention probabilities (profiling)

    # ---- growth and attention inputs -------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor,
               role: torch.Tensor) -> None:
        """k, v: (H, n, D); seq, pos, role: (n,) shared by all heads."""
        n = k.shape[1]
        self.k = torch.cat([self.k, k.to(self.k.dtype)], dim=1)
        self.v = torch.cat([self.v, v.to(self.v.dtype)], dim=1)
        self.seq = torch.cat([self.seq, seq.expand(self.h, n)], dim=1)
        self.pos = torch.cat([self.pos, pos.expand(self.h, n)], dim=1)
        self.role = torch.cat([self.role, role.to(torch.int8).expand(self.h, n)], dim=1)
        self.valid = torch.cat([self.valid, self.valid.new_ones(self.h, n)], dim=1)
        if self.score is not None:
            self.score = torch.cat([self.score, self.score.new_zeros(self.h, n)], dim=1)

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, C, D) keys and values as attention consumes them."""
        return self.k, self.v

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

    # ---- eviction ------------------------------------------------------------------------
    def live(self) -> torch.Tensor:
        return self.valid.sum(dim=1)  # (H,)

    def compact(self, keep: torch.Tensor) -> None:
        """Keep the slots where keep (H, C) is True, in their current order; reallocate."""
        keep = keep & self.valid
        counts = keep.sum(dim=1)
        c = int(counts.max()) if counts.numel() else 0
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :c]  # (H, c)
        idx = order[..., None].expand(-1, -1, self.d)
        self.k = torch.gather(self.k, 1, idx)
        self.v = torch.gather(self.v, 1, idx)
        self.seq = torch.gather(self.seq, 1, order)
        self.pos = torch.gather(self.pos, 1, order)
        self.role = torch.gather(self.role, 1, order)
        self.valid = torch.arange(c, device=keep.device)[None, :] < counts[:, None]
        if self.score is not None:
            self.score = torch.gather(self.score, 1, order)

    # ---- accounting ----------------------------------------------------------------------
    def nbytes(self) -> int:
        """K/V bytes allocated, padding included."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def live_bytes(self) -> int:
        return int(self.valid.sum()) * self.d * 2 * self.k.element_size()

    def meta_bytes(self) -> int:
        ts = [self.seq, self.pos, self.role, self.valid] + ([self.score] if self.score is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)
