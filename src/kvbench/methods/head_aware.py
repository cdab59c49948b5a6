"""Head-Aware Dynamic KV Budgeting and its uniform ablation partner.

Heads are profiled as retrieval / induction / local (kvbench.profiling); each KV head gets a token
budget proportional to its type's share, with the layer's total equal to the uniform budget x
heads. Inside each head an existing selection rule runs, chosen by type (composition, not a
copy): local heads keep sinks + a recent window (StreamingLLM), retrieval and induction heads keep
heavy hitters + a recent window (H2O); `local_rule: h2o` makes local heads use H2O too, so that
only the budgets differ by head type.

Default shares (retrieval 2 : induction 1 : local 0.5) follow the reasoning of retrieval-head work
(Wu et al. 2024; Xiao et al. 2024 "DuoAttention"): retrieval heads need distant tokens, local heads
mostly the recent window, so moving budget from local to retrieval heads keeps quality at the same
total. Storage groups each layer's heads by budget (`grouped_per_head`: one buffer per group, no
padding to the largest head), so head_aware allocates the bytes of its budget, as uniform does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerView, Method, register
from .h2o import H2O
from .streaming_llm import StreamingLLM


def split_budget(total: int, weights: list[float], minimum: int) -> list[int]:
    """Integers proportional to weights, >= minimum, summing to total (largest remainders)."""
    n = len(weights)
    if total < minimum * n:
        raise ValueError(f"budget too small: {total} tokens cannot give {n} heads {minimum} each")
    free = total - minimum * n
    s = sum(weights)
    raw = [free * w / s for w in weights]
    out = [int(r) for r in raw]
    for i in sorted(range(n), key=lambda i: (out[i] - raw[i], i))[: free - sum(out)]:
        out[i] += 1
    return [o + minimum for o in out]


@register
@dataclass
class HeadAware(Method):
    type_name = "head_aware"
    paper = "head-aware dynamic KV budgeting (this benchmark's core method); heads as in Wu et al. 2024"
    needs_scores = True
    needs_profile = True
    rowwise = True
    layout = "grouped_per_head"
    share_retrieval: float = 2.0
    share_induction: float = 1.0
    share_local: float = 0.5
    n_sink: int = 4
    recent_ratio: float = 0.5
    # how a local head chooses inside its budget: "window" (sinks + recent, as streaming heads in
    # DuoAttention) or "h2o" (heavy hitters + recent, as retrieval heads; then only budgets differ by type)
    local_rule: str = "window"

    def validate(self, budget):
        for k in ("share_retrieval", "share_induction", "share_local"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{self.type_name}: {k} must be > 0, got {getattr(self, k)}")
        if self.local_rule not in ("window", "h2o"):
            raise ValueError(f"{self.type_name}: local_rule must be 'window' or 'h2o', got {self.local_rule!r}")
        if budget is not None and self.n_sink >= budget:
            raise ValueError(f"{self.type_name}: n_sink ({self.n_sink}) must be smaller than the budget ({budget})")

    def shares(self) -> dict[str, float]:
        return {"retrieval": self.share_retrieval, "induction": self.share_induction, "local": self.share_local}

    def head_budgets(self, budget, n_layers, n_heads, profile=None):
        if profile is None:
            raise ValueError(f"{self.type_name} needs a head profile")
        w = self.shares()
        rows = [split_budget(budget * n_heads, [w[t] for t in profile.types[li]], self.n_sink + 1)
                for li in range(n_layers)]
        return torch.tensor(rows, dtype=torch.long)

    def select(self, view: LayerView, budgets):
        if self.local_rule == "h2o":
            return H2O(recent_ratio=self.recent_ratio).select(view, budgets)
        kinds = set(view.kinds) if view.kinds is not None else None
        if kinds == {"local"}:  # every head of the view local (head groups are often one type)
            return StreamingLLM(n_sink=self.n_sink).select(view, budgets)
        if kinds is not None and "local" not in kinds:
            return H2O(recent_ratio=self.recent_ratio).select(view, budgets)
        local = view.is_type("local")  # (H, 1)
        window = StreamingLLM(n_sink=self.n_sink).select(view, budgets)
        heavy = H2O(recent_ratio=self.recent_ratio).select(view, budgets)
        return torch.where(local, window, heavy)


@register
@dataclass
class Uniform(HeadAware):
    """The ablation partner: same total and same per-type selection rule, equal per-head budgets."""

    type_name = "uniform"
    paper = "ablation of head_aware (equal budgets per head)"
    layout = "dense"

    def shares(self) -> dict[str, float]:
        return {"retrieval": 1.0, "induction": 1.0, "local": 1.0}
