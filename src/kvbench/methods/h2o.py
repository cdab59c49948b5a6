"""H2O: heavy hitters + a recent window.

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS). Each key's score is the attention it has received, accumulated over every query
of prefill and decode; with GQA the scores of a KV head sum over its query heads. Keeps the
`recent_ratio x budget` most recent tokens and fills the rest of the budget with the highest-score
older tokens. Eviction runs after every prefill chunk and every decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import LayerView, Method, register, top_by


@register
@dataclass
class H2O(Method):
    type_name = "h2o"
    paper = "Zhang et al. 2023 (NeurIPS), arXiv:2306.14048"
    needs_scores = True
    rowwise = True
    recent_ratio: float = 0.5

    def validate(self, budget):
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"h2o: recent_ratio must be in [0, 1], got {self.recent_ratio}")

    def select(self, view: LayerView, budgets):
        n_recent = (budgets.float() * self.recent_ratio).long()
        recent = view.recent(n_recent)
        heavy = top_by(view.score, view.valid & ~recent, budgets - n_recent,
                       by_age=None if view.ordered else view.age_order())
        return recent | heavy
