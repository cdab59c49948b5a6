"""StreamingLLM: attention sinks + a recent window.

Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks" (ICLR). Keeps the
first `n_sink` tokens of the stream forever and the most recent `budget - n_sink`.

`positions` (how RoPE positions are assigned once tokens are evicted; kvbench.streams.PositionRule):
- `shifted` (default): the paper's re-indexing, made consistent with Group Position Encoding. Sinks
  keep their positions; every other entry takes its original position minus one shift shared by
  the source and target groups, so positions stay bounded (as in the paper) and every offset between
  non-sink entries, within and across groups, is the one the model reads without eviction (the
  source-target offset of wait-k GPE included). On a single position group (plain text) this is
  exactly the paper's rank in the cache, so the default is right with and without GPE. `max_lead`
  (W, default: the budget) bounds how far one group's window may run ahead of the other's before
  that offset is shortened (only the oracle layout, the whole source before the target, gets there);
  positions stay in [0, B + W] for a one-token step.
- `cache`: each GPE group re-ranked on its own (the paper's rule applied per group). An ablation: it
  BREAKS the GPE source-target offset (the source group loses more tokens than the target group, so
  the offset from the current target query to the latest source key collapses, e.g. from -10 to -3,
  and the model stops translating).
- `original`: the positions tokens were read at (no re-indexing).
Re-indexed positions are applied by the engine at every forward from unrotated keys (no drift).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..streams import REINDEX_MODES, PositionRule
from .base import LayerView, Method, register

POSITIONS = REINDEX_MODES + ("original",)


@register
@dataclass
class StreamingLLM(Method):
    type_name = "streaming_llm"
    paper = "Xiao et al. 2024 (ICLR), arXiv:2309.17453"
    entries_only = True  # sinks + recent window: a function of the entries' stream order alone
    rowwise = True
    n_sink: int = 4
    positions: str = "shifted"
    max_lead: int | None = None

    @property
    def cache_positions(self) -> bool:
        return self.positions != "original"

    @property
    def position_rule(self) -> PositionRule | None:
        """What the engine reads: None (original positions) or the re-indexing rule."""
        if self.positions == "original":
            return None
        return PositionRule(self.positions, self.n_sink, self.max_lead)

    def validate(self, budget):
        if self.positions not in POSITIONS:
            raise ValueError(f"streaming_llm: positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.n_sink < 0:
            raise ValueError(f"streaming_llm: n_sink must be >= 0, got {self.n_sink}")
        if budget is not None and self.n_sink >= budget:
            raise ValueError(f"streaming_llm: n_sink ({self.n_sink}) must be smaller than the budget ({budget})")
        if self.max_lead is not None and (not isinstance(self.max_lead, int) or self.max_lead < 0):
            raise ValueError(f"streaming_llm: max_lead must be None or an int >= 0, got {self.max_lead!r}")

    def select(self, view: LayerView, budgets):
        return view.oldest(self.n_sink) | view.recent(budgets - self.n_sink)
