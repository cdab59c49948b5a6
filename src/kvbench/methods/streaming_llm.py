"""StreamingLLM: attention sinks + a recent window.

Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks" (ICLR). Keeps the
first `n_sink` tokens of the stream forever and the most recent `budget - n_sink`. With
`positions: cache` (the paper's choice) keys are re-rotated so positions are ranks within the
cache; `positions: original` keeps the positions tokens were read at.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import LayerView, Method, register


@register
@dataclass
class StreamingLLM(Method):
    type_name = "streaming_llm"
    paper = "Xiao et al. 2024 (ICLR), arXiv:2309.17453"
    n_sink: int = 4
    positions: str = "cache"

    @property
    def cache_positions(self) -> bool:
        return self.positions == "cache"

    def validate(self, budget):
        if self.positions not in ("cache", "original"):
            raise ValueError(f"streaming_llm: positions must be 'cache' or 'original', got {self.positions!r}")
        if self.n_sink < 0:
            raise ValueError(f"streaming_llm: n_sink must be >= 0, got {self.n_sink}")
        if budget is not None and self.n_sink >= budget:
            raise ValueError(f"streaming_llm: n_sink ({self.n_sink}) must be smaller than the budget ({budget})")

    def select(self, view: LayerView, budgets):
        return view.oldest(self.n_sink) | view.recent(budgets - self.n_sink)
