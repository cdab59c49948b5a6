"""The four tasks an eval job can run on one sample, each returning the task's row fields.

- `translate_stream`: word-level wait-k simultaneous translation with Group Position Encoding;
  greedy WRITE of one word / READ of one source word; delays recorded per target word.
- `translate_batch`: the oracle: the whole source first, then the translation (wait-k with k = inf).
- `ppl`: NLL of a long document read through the method's cache (eviction applies while reading);
  for a translation document, the teacher-forced wait-k stream scored on target tokens; for plain
  text, every token after the first.
- `latency`: per-token decode latency after a prefill of the document (warm-up, repeats, median, p90).

Budget during prefill (every task feeds through `Session.feed`, see kvbench.engine.session): under a
budget B, every token fed, whether instruction, source word (the k wait words and every READ), target
token (WRITE) or a document token scored for perplexity, is computed with at most B cached entries per
(layer, KV head) visible, plus itself. A multi-token feed runs as a plain forward only while the whole
of it fits in every head's budget (nothing is evicted inside it, so chunking is exact); past that, the
session runs it stepwise (each token appended, attended and evicted back to B in turn, in every layer:
what one-token forwards compute). Hence `ppl` of an evicting method equals its
token-by-token value whatever `chunk_size` is, and the cache holds at most B + 1 entries per head (B +
the token being written) during a forward (`retained_tokens_peak` <= B + 1 for token budgets).
"""

from __future__ import annotations

import math
import time

import torch

from . import streams
from .streams import ROLE_INSTR, ROLE_SOURCE, ROLE_TARGET
from .metrics import lagging_scores

TASKS = ("translate_stream", "translate_batch", "ppl", "latency")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_word_tokens(src: list[list[int]]) -> int:
    """Tokens one written word may take (multi-token tokenizers): 4x the source's longest word, at
    least 16. A model that never writes a word start (random weights, a degenerate output) then still
    writes words, and the loop ends within its word cap."""
    return max(16, 4 * max((len(w) for w in src), default=0))


def translate(session, prompter, doc: dict, k: int, target_offset: int = 0) -> dict:
    """wait-k WRITE/READ loop. The token that carries a WRITE's query is the last chosen target
    token (or the target-start marker), fed only after the READ before it, as in training. With
    multi-token words, the token that begins the next word is chosen before that READ (one-token
    look-ahead). Under a budget B, the instruction + k wait words, every READ and every WRITE token
    each see at most B cached entries per head plus themselves (the session runs a feed that would
    pass the budget stepwise), so the source KV the target reads was itself computed within the
    budget."""
    src = prompter.words(doc["source"])
    if not src:
        raise ValueError(f"sample {doc['id']}: empty source document")
    instr = prompter.instruction()
    cap = math.ceil(1.5 * len(src)) + 5  # words
    max_word = max_word_tokens(src)
    session.feed(instr, list(range(len(instr))), [ROLE_INSTR] * len(instr))
    src_pos, tgt_pos, read = len(instr), target_offset, 0

    def feed_target(tokens):
        nonlocal tgt_pos
        out = session.feed(tokens, list(range(tgt_pos, tgt_pos + len(tokens))), [ROLE_TARGET] * len(tokens))
        tgt_pos += len(tokens)
        return out

    def read_word():
        nonlocal src_pos, read
        w = src[read]
        session.feed(w, list(range(src_pos, src_pos + len(w))), [ROLE_SOURCE] * len(w))
        src_pos += len(w)
        read += 1

    while read < min(k, len(src)):
        read_word()
    hyp, delays, stop = [], [], "length_cap"
    carry, carry_in_word = prompter.target_start(), False
    while len(delays) < cap:
        logits = feed_target(carry)
        word = list(carry) if carry_in_word else []
        carry = []
        while True:  # WRITE one word
            t = int(logits[-1].argmax())
            if t == prompter.eos_id:
                break
            if prompter.single_token_words:
                word, carry = [t], [t]
                break
            if word and (prompter.word_start(t) or len(word) >= max_word):
                carry, carry_in_word = [t], True  # t begins the next word
                break
            word.append(t)
            logits = feed_target([t])
        if word:
            hyp += word
            delays.append(read)
        if not carry:
            stop = "eos"
            break
        if read < len(src):
            read_word()
    hyp_text, ref = prompter.decode(hyp), doc.get("target", "")
    # SimulEval 1.1.4's AL/LAAL: an empty hypothesis is skipped (NaN), |ref| = words split on " "
    lag = lagging_scores(delays, len(src), ref)
    lag.pop("lagging_skipped")  # the aggregation counts skipped samples from hyp_words == 0
    return dict(
        source=doc["source"], hypothesis=hyp_text, reference=ref, delays=[float(d) for d in delays],
        src_words=len(src), hyp_words=len(delays), stop_reason=stop,
        wait_k=min(k, streams.WAIT_INF), **lag,
    )


def document_stream(prompter, doc: dict, k: int, target_offset: int = 0) -> tuple[streams.Stream, torch.Tensor]:
    """The teacher-forced stream of a document and its labels (next token to score, -100: none)."""
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


def perplexity(session, prompter, doc: dict, k: int, target_offset: int = 0) -> dict:
    """NLL of the document's labels, fed in `chunk_size` pieces; the session evicts inside a piece
    token by token (stepwise), so every scored token is predicted from at most B cached entries per
    head (+ itself): the value equals the token-by-token one."""
    s, labels = document_stream(prompter, doc, k, target_offset)
    nll, n, c = 0.0, 0, session.chunk_size
    for a in range(0, len(s.ids), c):
        b = min(a + c, len(s.ids))
        logits = session.feed(s.ids[a:b], s.pos[a:b], s.role[a:b], logits="all").float()  # (n, V)
        lab = labels[a:b].to(logits.device)
        m = lab >= 0
        if bool(m.any()):
            lp = torch.log_softmax(logits[m], dim=-1)
            nll -= float(lp.gather(1, lab[m][:, None]).sum())
            n += int(m.sum())
    return dict(nll_sum=nll, n_scored_tokens=n, nll_per_token=nll / max(n, 1))


def latency(session, prompter, doc: dict, k: int, target_offset: int = 0, n_decode: int = 32,
            warmup: int = 4) -> dict:
    s, _ = document_stream(prompter, doc, k, target_offset)
    logits = session.feed(s.ids, s.pos, s.role)
    pos, role = s.pos[-1] + 1, s.role[-1]
    times = []
    for i in range(warmup + n_decode):
        t = int(logits[-1].argmax())
        _sync(session.device)
        t0 = time.perf_counter()
        logits = session.feed([t], [pos + i], [role])
        _sync(session.device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    tt = torch.tensor(times)
    return dict(decode_ms_median=float(tt.median()), decode_ms_p90=float(torch.quantile(tt, 0.9)))


def run_task(task: str, session, prompter, doc: dict, params: dict) -> dict:
    k = int(params.get("wait_k", 5))
    off = int(params.get("target_offset", 0))
    if task == "translate_stream":
        return translate(session, prompter, doc, k, off)
    if task == "translate_batch":
        return translate(session, prompter, doc, streams.WAIT_INF, off)
    if task == "ppl":
        return perplexity(session, prompter, doc, k, off)
    if task == "latency":
        return latency(session, prompter, doc, k, off, int(params.get("n_decode", 32)), int(params.get("warmup", 4)))
    raise ValueError(f"unknown task {task!r}; known: {list(TASKS)}")
