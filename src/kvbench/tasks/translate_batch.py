"""`translate_batch`: the oracle. The whole source first, then the translation (wait-k with k = inf);
its BLEU is the upper bound of streaming translation."""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .translation import Translation, translate


@register
@dataclass(frozen=True)
class TranslateBatch(Translation):
    name = "translate_batch"
    order = 1
    summary = "whole source first: the upper bound"

    def run(self, session, prompter, doc: dict) -> dict:
        from ..streams import WAIT_INF

        return translate(session, prompter, doc, WAIT_INF, self.target_offset)
