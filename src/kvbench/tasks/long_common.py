"""What the long-context tasks (niah, ruler) share: a sample as the task feeds it, the chat-template
frame of a hub model, greedy decoding through the session, and the accuracy cells.

A sample is a list of feeds (token ids, positions, roles), fed in order through `Session.feed`, so the
cache compresses while it reads the context, before the question arrives (query last); the answer is
then decoded greedily through the same session. Hub models (an HF tokenizer) read one position group
(every token fed and generated takes the next position; roles are never `target`, so StreamingLLM's
re-indexing is its plain rank in the cache); the builtin model reads its trained translation layout
(kvbench.tasks.niah).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from .base import Task


@dataclass
class Sample:
    """One long-context sample, ready to feed. `feeds`: (ids, pos, role) lists fed in order (the
    context before the question, or the question first with query_first); `next_pos`/`gen_role`:
    where generated tokens go; `n_new`: at most that many tokens are generated (EOS stops earlier);
    `needle`: stream indices (the session's token order) of the needle's tokens, first = its first
    token; `info`: the row fields known before decoding."""

    feeds: list[tuple[list[int], list[int], list[int]]]
    next_pos: int
    gen_role: int
    n_new: int
    needle: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for ids, _, _ in self.feeds)

    @property
    def stream(self) -> list[int]:
        """Every token id fed, in order."""
        return [t for ids, _, _ in self.feeds for t in ids]

    def positions_needed(self) -> int:
        """Positions the sample needs: the largest fed one + the generated tokens fed back (+1)."""
        last = max(p for _, pos, _ in self.feeds for p in pos)
        return max(last, self.next_pos + self.n_new - 2) + 1


def sample_seed(doc: dict) -> int:
    """A document's own seed (its id and text): the same document gives the same needle everywhere."""
    return zlib.crc32(f"{doc['id']}|{doc['source']}".encode())


def encode(prompter, text: str) -> list[int]:
    return list(prompter.tok(text, add_special_tokens=False)["input_ids"]) if text else []


def counter(prompter):
    """Token count of a text with the model's tokenizer (longctx's `count`)."""
    return lambda text: len(encode(prompter, text))


def frame(prompter) -> tuple[list[int], list[int]]:
    """(head, tail): the tokens a hub model's chat template puts before and after the user's message
    (the tail ends with the assistant header); without a chat template, BOS and nothing."""
    tok = prompter.tok
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": "\x00"}], add_generation_prompt=True,
                                       tokenize=False)
        if text.count("\x00") == 1:
            head, tail = text.split("\x00")
            return encode(prompter, head), encode(prompter, tail)
    return list(prompter.bos), []


def one_group(parts: list[list[int]], roles: list[int]) -> list[tuple[list[int], list[int], list[int]]]:
    """Feeds of consecutive positions 0, 1, ... (one position group) from token lists and their roles."""
    out, p = [], 0
    for ids, r in zip(parts, roles):
        out.append((ids, list(range(p, p + len(ids))), [r] * len(ids)))
        p += len(ids)
    return out


def decode_greedy(session, prompter, sample: Sample) -> list[int]:
    """Feed the sample, then greedily generate up to `n_new` tokens through the same session (each
    chosen token is fed back before the next is chosen; the last one is not fed)."""
    logits = None
    for ids, pos, role in sample.feeds:
        if ids:
            logits = session.feed(ids, pos, role)
    out, p = [], sample.next_pos
    while len(out) < sample.n_new:
        t = int(logits[-1].argmax())
        if t == prompter.eos_id:
            break
        out.append(t)
        if len(out) == sample.n_new:
            break
        logits = session.feed([t], [p], [sample.gen_role])
        p += 1
    return out


class AccuracyCells(Task):
    """Cells of a task whose rows hold a per-sample `score` in [0, 1]: the mean (`accuracy`) and its
    95% percentile bootstrap CI over samples."""

    def cell(self, g) -> dict:
        s = g["score"].dropna()
        return {"accuracy": float(s.mean())} if len(s) else {}

    def cell_ci(self, g, n_resamples: int, seed: int) -> dict:
        from ..stats import mean_ci

        return mean_ci(g.sort_values("sample_id")["score"].dropna().astype(float), n_resamples, seed, "accuracy")


class ScoreCells(Task):
    """Cells of a task whose rows hold a per-sample `score` in [0, 1] under a named `metric` (a
    benchmark's F1, ROUGE, exact match...): the mean (`score`, with the metric named in the cell) and
    its 95% percentile bootstrap CI over samples. Not called accuracy: most of these metrics are not."""

    def cell(self, g) -> dict:
        s = g["score"].dropna()
        metric = "+".join(sorted({str(m) for m in g["metric"].dropna()})) if "metric" in g else None
        return {"score": float(s.mean()), "metric": metric or None} if len(s) else {}

    def cell_ci(self, g, n_resamples: int, seed: int) -> dict:
        from ..stats import mean_ci

        return mean_ci(g.sort_values("sample_id")["score"].dropna().astype(float), n_resamples, seed, "score")
