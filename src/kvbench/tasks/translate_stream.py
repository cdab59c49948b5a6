"""`translate_stream`: word-level wait-k simultaneous translation with Group Position Encoding.

Read the instruction and k source words, then alternate WRITE (greedy, until a target word
completes; its delay is the number of source words read) and READ (one source word) until the source
ends, then finish the target. Source and target are separate position groups; source tokens never
attend to target tokens; nothing is re-encoded. Rows: hypothesis, reference, delays, AL and LAAL.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .common import WaitK
from .translation import Translation, translate


@register
@dataclass(frozen=True)
class TranslateStream(Translation, WaitK):
    name = "translate_stream"
    order = 0
    summary = "wait-k simultaneous translation"

    def run(self, session, prompter, doc: dict) -> dict:
        return translate(session, prompter, doc, self.wait_k, self.target_offset)
