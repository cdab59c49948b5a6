"""wait-k pinned: the schedule, the stored delays, the stream fed at inference, and AL.

Unit tier: `streams.build_stream` (the stream the builtin model is trained on) against a word-by-word
reference of wait-k (Ma et al. 2019): exactly min(k + j, |src|) source words are read before target word
j is written; multi-token words stay whole. Model tier: `tasks.translate` on the tiny model with a full
cache, recording every token the engine is fed: the fed stream is the training stream of the same words,
each stored delay is the number of source words fed before the word was chosen, and AL equals k.

    python -m pytest -q tests/test_alg_waitk.py
"""

from __future__ import annotations

import pytest
import torch

from kvbench import streams, tasks
from kvbench.engine.session import Session
from kvbench.streams import ROLE_INSTR, ROLE_SOURCE, ROLE_TARGET
from kvbench.methods import method_from_config
from kvbench.metrics import average_lagging
from kvbench.prompt import Prompter

KS = (1, 2, 3, 5, streams.WAIT_INF)
K_IDS = ["k1", "k2", "k3", "k5", "oracle"]


def words_of(sizes: list[int], start: int) -> list[list[int]]:
    """Words of the given token counts with distinct token ids from `start`."""
    out, t = [], start
    for n in sizes:
        out.append(list(range(t, t + n)))
        t += n
    return out


SRC = words_of([1, 2, 1, 3, 1, 1, 2, 1], 100)  # 8 source words, 12 tokens
TGT = words_of([1, 1, 2, 1, 3, 1, 1, 1, 2, 1, 1], 200)  # the start marker, then 10 target words
INSTR = [1, 2, 3]


def reference_reads(k: int, j: int, n_src: int) -> int:
    """wait-k: source words read before target word j (0-based) is written."""
    return min(k + j, n_src)


@pytest.mark.parametrize("k", KS, ids=K_IDS)
@pytest.mark.parametrize("offset", [0, 7])
def test_build_stream_is_wait_k(k, offset):
    s = streams.build_stream(INSTR, SRC, TGT, k, target_offset=offset, eos=9)
    n = len(SRC)
    assert s.ids[: len(INSTR)] == INSTR and s.role[: len(INSTR)] == [ROLE_INSTR] * len(INSTR)
    # walk the stream word by word: source words whole and in order, target words whole and in order
    i, read, written, delays = len(INSTR), 0, 0, []
    while i < len(s.ids):
        if s.role[i] == ROLE_SOURCE:
            w = SRC[read]
            assert s.ids[i:i + len(w)] == w and s.role[i:i + len(w)] == [ROLE_SOURCE] * len(w)
            i, read = i + len(w), read + 1
        else:
            w = TGT[written]
            assert s.ids[i:i + len(w)] == w and s.role[i:i + len(w)] == [ROLE_TARGET] * len(w)
            assert read == reference_reads(k, written, n), f"target word {written}: {read} source words read"
            delays += [read] * len(w)
            i, written = i + len(w), written + 1
    assert read == n and written == len(TGT)
    assert s.delay == delays
    # GPE positions: instruction + source count from 0, target from the offset, each group contiguous
    src_pos = [p for p, r in zip(s.pos, s.role) if r != ROLE_TARGET]
    tgt_pos = [p for p, r in zip(s.pos, s.role) if r == ROLE_TARGET]
    assert src_pos == list(range(len(src_pos))) and tgt_pos == list(range(offset, offset + len(tgt_pos)))
    # labels: every target token predicts the next target token, the last one EOS; nothing else is scored
    tgt_idx = [a for a, r in enumerate(s.role) if r == ROLE_TARGET]
    flat = [t for w in TGT for t in w]
    assert [s.labels[a] for a in tgt_idx] == flat[1:] + [9]
    assert all(s.labels[a] == -100 for a, r in enumerate(s.role) if r != ROLE_TARGET)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_exactly_k_source_words_before_the_first_write(k):
    s = streams.build_stream(INSTR, SRC, TGT, k)
    first = s.role.index(ROLE_TARGET)
    src_tokens = [t for t, r in zip(s.ids[:first], s.role[:first]) if r == ROLE_SOURCE]
    assert src_tokens == [t for w in SRC[:k] for t in w]  # k whole words (all 8 when k = 8), not k tokens
    assert s.delay[0] == k
    assert streams.reads_before_write(0, k, len(SRC)) == k
    assert [streams.reads_before_write(j, k, len(SRC)) for j in range(12)] == [min(k + j, 8) for j in range(12)]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_wait_k_delays_have_al_k(k):
    """The wait-k delays of a hypothesis as long as the source (and the reference) give AL = k exactly."""
    n = len(SRC)
    tgt = [[300]] + [[301 + j] for j in range(n)]  # start marker + n one-token words
    s = streams.build_stream(INSTR, SRC, tgt, k)
    delays = s.delay[:n]  # the token fed at index j chooses word j
    assert delays == [min(k + j, n) for j in range(n)]
    assert average_lagging(delays, n, ref_len=n) == pytest.approx(k)
    assert average_lagging(delays + [n] * 5, n, ref_len=n) == pytest.approx(k)  # over-long hypotheses too


# ---- inference on the tiny model ---------------------------------------------------------------
class RecordingSession(Session):
    """A full-cache session that keeps every (id, pos, role) it is fed, in order."""

    def __init__(self, model):
        super().__init__(model, method_from_config("full", {}), None, chunk_size=16)
        self.fed: list[tuple[int, int, int]] = []

    def feed(self, ids, pos, role, logits="last"):
        ids, pos, role = (torch.as_tensor(x).tolist() for x in (ids, pos, role))
        self.fed += list(zip(ids, pos, role))
        return super().feed(ids, pos, role, logits)


@pytest.mark.parametrize("k", KS, ids=K_IDS)
def test_translate_feeds_the_training_stream(tiny, docs, k):
    """The token stream `translate` feeds is `streams.build_stream` of the words it wrote (the layout the
    builtin model was trained on), up to the source words never read; each stored delay is the number of
    source words fed before the word was chosen; the first word is chosen after exactly k source words."""
    model, tok, d = tiny
    p = Prompter(tok, d, "syn_src", "syn_tgt")
    offset = 3 if k == 2 else 0
    for doc in docs[96]:
        sess = RecordingSession(model)
        row = tasks.translate(sess, p, doc, k, target_offset=offset)
        src = p.words(doc["source"])
        n = len(src)
        fed_ids, fed_pos, fed_role = (list(x) for x in zip(*sess.fed))
        tgt_at = [i for i, r in enumerate(fed_role) if r == ROLE_TARGET]
        written = [[fed_ids[i]] for i in tgt_at]  # start marker + the words fed back (one token each)
        ref = streams.build_stream(p.instruction(), src, written, k, target_offset=offset)
        m = len(sess.fed)
        assert (fed_ids, fed_pos, fed_role) == (ref.ids[:m], ref.pos[:m], ref.role[:m]), f"k={k}"
        assert all(r == ROLE_SOURCE for r in ref.role[m:])  # only unread source is left over
        # delays: source words fed before the token whose logits chose word j (the j-th target feed)
        n_src_before = [sum(r == ROLE_SOURCE for r in fed_role[:i]) for i in tgt_at]
        hyp = row["hyp_words"]
        assert hyp > n and row["delays"][: len(tgt_at)] == n_src_before[:hyp]
        assert row["delays"] == [float(min(k + j, n)) for j in range(hyp)] == [float(x) for x in ref.delay[:hyp]]
        assert n_src_before[0] == min(k, n)
        # a full cache on a source as long as its reference: AL is k (the whole source when k >= |src|)
        assert row["src_words"] == row["ref_words"] == n
        assert row["al"] == pytest.approx(min(k, n))


@pytest.mark.parametrize("k", [1, 3])
def test_perplexity_feeds_the_training_stream(tiny, docs, k):
    """Teacher-forced scoring feeds exactly `build_stream` of the reference (what training saw)."""
    model, tok, d = tiny
    p = Prompter(tok, d, "syn_src", "syn_tgt")
    doc = docs[96][1]
    sess = RecordingSession(model)
    tasks.perplexity(sess, p, doc, k)
    ref = streams.build_stream(p.instruction(), p.words(doc["source"]),
                              [p.target_start()] + p.words(doc["target"]), k, eos=p.eos_id)
    assert sess.fed == list(zip(ref.ids, ref.pos, ref.role))
