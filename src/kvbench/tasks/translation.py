"""What the two translation tasks share: the word-level wait-k WRITE/READ loop with Group Position
Encoding, the positions a document needs, and the cell scores (corpus BLEU/chrF with sacreBLEU's
bootstrap CI and paired tests against `full`, AL/LAAL as SimulEval 1.1.4 averages them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .common import TargetGroup, max_word_tokens

TOKEN_CAP_A, TOKEN_CAP_B = 2, 10  # target tokens <= 2 x source tokens + 10

COLUMNS = ("source", "hypothesis", "reference", "delays", "src_words", "hyp_words", "stop_reason", "wait_k",
           "al", "laal", "ref_words")


def translate(session, prompter, doc: dict, k: int, target_offset: int = 0) -> dict:
    """wait-k WRITE/READ loop. The token that carries a WRITE's query is the last chosen target
    token (or the target-start marker), fed only after the READ before it, as in training. With
    multi-token words, the token that begins the next word is chosen before that READ (one-token
    look-ahead). Under a budget B, the instruction + k wait words, every READ and every WRITE token
    each see at most B cached entries per head plus themselves (the session runs a feed that would
    pass the budget stepwise), so the source KV the target reads was itself computed within the
    budget.

    Length caps (stop_reason "length_cap"): 1.5 x the source's words + 5 words, each word at most as
    many tokens as the longest source word, and at most TOKEN_CAP_A x the source's tokens +
    TOKEN_CAP_B tokens in all (fairseq's and SimulEval's max_len_a * |src| + max_len_b). A model that
    stops by itself never meets them; a degenerate one (the random twins) stops there instead of
    writing ~5x the source's tokens."""
    from .. import streams
    from ..metrics import lagging_scores
    from ..streams import ROLE_INSTR, ROLE_SOURCE, ROLE_TARGET

    src = prompter.words(doc["source"])
    if not src:
        raise ValueError(f"sample {doc['id']}: empty source document")
    instr = prompter.instruction()
    cap = math.ceil(1.5 * len(src)) + 5  # words
    token_cap = TOKEN_CAP_A * sum(len(w) for w in src) + TOKEN_CAP_B
    max_word = max_word_tokens(src)
    # tokens read but not fed yet: a READ's words ride in the forward of the target token that follows
    # them (the same stream in the same order, one forward instead of two; the session runs a forward
    # stepwise when a head would pass its budget inside it, so this computes what separate feeds do)
    pend_ids, pend_pos, pend_role = list(instr), list(range(len(instr))), [ROLE_INSTR] * len(instr)
    src_pos, tgt_pos, read = len(instr), target_offset, 0

    def feed_target(tokens):
        nonlocal tgt_pos
        ids = pend_ids + list(tokens)
        pos = pend_pos + list(range(tgt_pos, tgt_pos + len(tokens)))
        out = session.feed(ids, pos, pend_role + [ROLE_TARGET] * len(tokens))
        del pend_ids[:], pend_pos[:], pend_role[:]
        tgt_pos += len(tokens)
        return out

    def read_word():
        nonlocal src_pos, read
        w = src[read]
        pend_ids.extend(w)
        pend_pos.extend(range(src_pos, src_pos + len(w)))
        pend_role.extend([ROLE_SOURCE] * len(w))
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
            if len(hyp) + len(word) >= token_cap:
                break
            logits = feed_target([t])
        if word:
            hyp += word
            delays.append(read)
        if len(hyp) >= token_cap:
            break
        if not carry:
            stop = "eos"
            break
        if read < len(src):
            read_word()
    if pend_ids:  # a READ no WRITE followed: fed, so the stream, token counts and memory hold it (today's word
        # cap lies above the source length, so every READ is followed by a WRITE; this keeps it so if caps change)
        session.feed(pend_ids, pend_pos, pend_role)
    hyp_text, ref = prompter.decode(hyp), doc.get("target", "")
    # SimulEval 1.1.4's AL/LAAL: an empty hypothesis is skipped (NaN), |ref| = words split on " "
    lag = lagging_scores(delays, len(src), ref)
    lag.pop("lagging_skipped")  # the aggregation counts skipped samples from hyp_words == 0
    return dict(
        source=doc["source"], hypothesis=hyp_text, reference=ref, delays=[float(d) for d in delays],
        src_words=len(src), hyp_words=len(delays), stop_reason=stop,
        wait_k=min(k, streams.WAIT_INF), **lag,
    )


def texts(s) -> list[str]:
    """A column of texts with missing values as empty strings."""
    return ["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in s]


@dataclass(frozen=True)
class Translation(TargetGroup):
    translation = True
    kinds = ("parallel",)
    columns = COLUMNS

    def positions(self, prompter, doc: dict) -> tuple[int, int]:
        """Tokens: instruction + source + target start + reference. Positions: the source group, or the
        target group up to the decoding cap of `translate` for one-token words (other tokenizers: at
        least the reference; the eval's position guard checks each decoded token)."""
        target = doc.get("target") or ""
        instr, start = prompter.instruction(), prompter.target_start()
        src = sum(len(w) for w in prompter.words(doc["source"]))
        ref = sum(len(w) for w in prompter.words(target)) if target else 0
        cap = math.ceil(1.5 * len(doc["source"].split())) + 5 if prompter.single_token_words else 0
        return len(instr) + src + len(start) + ref, max(len(instr) + src, self.target_offset + len(start) + max(cap, ref))

    def cell(self, g) -> dict:
        from ..metrics import corpus_scores

        g = g.sort_values("sample_id")
        row = corpus_scores(texts(g["hypothesis"]), texts(g["reference"]))
        # SimulEval skips samples with an empty hypothesis (AL NaN): the mean leaves them out, counted here
        row.update(al=g["al"].mean(), laal=g["laal"].mean(), lagging_skipped=int((g["hyp_words"] == 0).sum()))
        return row

    def cell_ci(self, g, n_resamples: int, seed: int) -> dict:
        from ..stats import translation_ci

        g = g.sort_values("sample_id")
        return translation_ci(texts(g["hypothesis"]), texts(g["reference"]), n_resamples, seed)

    def versus_full(self, g, full, n_resamples: int, seed: int) -> dict:
        """sacreBLEU's paired bootstrap and approximate randomization on the shared sample ids."""
        import warnings

        from ..stats import paired_tests

        m = g.merge(full[["sample_id", "hypothesis", "reference"]], on="sample_id", suffixes=("", "_full"))
        same = m["reference"].fillna("") == m["reference_full"].fillna("")
        if not same.all():  # a paired test needs the same segments on both sides
            warnings.warn(f"{g['method'].iloc[0]} vs full ({g['task'].iloc[0]}, length {g['length'].iloc[0]}): "
                          f"{(~same).sum()} samples have different references and are left out of the paired tests")
            m = m[same]
        if m.empty:
            return {}
        m = m.sort_values("sample_id")
        return paired_tests(texts(m["hypothesis_full"]), texts(m["hypothesis"]), texts(m["reference"]),
                            n_resamples=n_resamples, seed=seed)
