"""What several tasks share: the parameter groups, the document stream, the word cap.

Budget during prefill (every task feeds through `Session.feed`, see kvbench.engine.session): under a
budget B, every token fed, whether instruction, source word (the k wait words and every READ), target
token (WRITE) or a document token scored for perplexity, is computed with at most B cached entries per
(layer, KV head) visible, plus itself. A multi-token feed runs as a plain forward only while the whole
of it fits in every head's budget (nothing is evicted inside it, so chunking is exact); past that, the
session runs it stepwise (each token appended, attended and evicted back to B in turn, in every layer:
what one-token forwards compute). Hence `ppl` of an evicting method equals its token-by-token value
whatever `chunk_size` is, and the cache holds at most B + 1 entries per head (B + the token being
written) during a forward (`retained_tokens_peak` <= B + 1 for token budgets).

torch (and kvbench.streams, which imports it) is imported inside the functions that run a task: the
registry is read by config validation and aggregation, which should not pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Task, param


@dataclass(frozen=True)
class TargetGroup(Task):
    """Tasks that place a target position group (Group Position Encoding)."""

    target_offset: int = param(0, minimum=0, filled=True,
                               help="first target position")


@dataclass(frozen=True)
class WaitK(Task):
    """Tasks that read a wait-k stream (translation documents; plain text ignores k)."""

    wait_k: int = param(5, minimum=1, filled=True, help="source words read before writing")



def max_word_tokens(src: list[list[int]]) -> int:
    """Tokens one written word may take (multi-token tokenizers): 4x the source's longest word, at
    least 16. A model that never writes a word start (random weights, a degenerate output) then still
    writes words, and the loop ends within its word cap."""
    return max(16, 4 * max((len(w) for w in src), default=0))


def document_stream(prompter, doc: dict, k: int, target_offset: int = 0):
    """(kvbench.streams.Stream, labels): the teacher-forced stream of a document and the next token to
    score at each position (-100: none). A translation document is the wait-k stream of source and
    reference; plain text is every token in order."""
    import torch

    from .. import streams
    from ..streams import ROLE_SOURCE

    if doc.get("target"):
        src, tgt = prompter.words(doc["source"]), prompter.words(doc["target"])
        s = streams.build_stream(prompter.instruction(), src, [prompter.target_start()] + tgt, k,
                                 target_offset, eos=prompter.eos_id)
    else:
        ids = prompter.plain(doc["source"])
        s = streams.Stream(ids, list(range(len(ids))), [ROLE_SOURCE] * len(ids), [], ids[1:] + [-100])
    if len(s.ids) < 2:
        raise ValueError(f"sample {doc['id']}: document has fewer than 2 tokens")
    return s, torch.tensor(s.labels)


@dataclass(frozen=True)
class DocumentTask(TargetGroup, WaitK):
    """Tasks that feed a whole document stream (ppl, latency): positions are those of the stream."""

    def positions(self, prompter, doc: dict) -> tuple[int, int]:
        from ..streams import WAIT_INF

        s, _ = document_stream(prompter, doc, min(self.wait_k, WAIT_INF), self.target_offset)
        return len(s.ids), max(s.pos) + 1 + self.extra_positions()
