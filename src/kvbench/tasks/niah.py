"""`niah`: needle in a haystack read through the method's cache. A needle (a key bound to a value) sits
at depth d of a filler context; the question comes after the context (`query_first: false`, the
default), so the cache is compressed while the context is read, before the question is seen; the
answer is then decoded greedily through the same session. Scored by `longctx.scoring.needle_exact_match`
(the value as a whole token of the prediction, case-insensitive); a cell's score is the accuracy.

Depths: `n_depths` evenly spaced depths 0, 1/(n-1), ..., 1 of the context; document i of the
dataset (a `source: haystack` dataset's filler, or any text document) takes depth i mod n_depths, so
`n_samples` = n_depths x m gives m samples per depth. Length: the job's length (the document's).

- Hub models (an HF tokenizer): `longctx.haystack.needle_sample` with the document's text as its
  filler (`TextFiller`): "The special magic number for KEY is VALUE." in the chat template's user
  message, the question after it ("What is the special magic number for KEY ..."); up to 32 tokens are
  generated. Prompt + generation fit in the length.
- The builtin model: its synthetic language. The filler is the haystack document's sentence pairs
  (no name binding, no reference); the needle is a binding sentence "the ROLE is called FIRST LAST ."
  and the question a later sentence whose object refers to the role ("the NOUN VERB PREP the ROLE .").
  The whole sample is read as the model was trained (kvbench.streams): the wait-k stream (k = wait_k,
  at least 2 so the role is read before its name is written) with Group Position Encoding, the target
  side teacher-forced with the reference translation up to the reference, where the model's trained
  behaviour is to write the bound name (transliterated, "FIRSTx LASTx"): the next two greedy tokens
  are the prediction, and the expected value is that name. The target side holds the needle's
  translation too, so the name can be found in either copy; `needle_position` is the binding's
  first source token. With `query_first` the question's source sentence is also read right after the
  instruction, before the context (the answer is still written at the end).

Row columns: depth (asked), depth_actual (share of filler tokens before the needle), needle_position
(index of the needle's first token in the stream fed), prediction, expected, score (0/1), query_first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .base import param, register
from .common import TargetGroup, WaitK
from .long_common import AccuracyCells, Sample, counter, decode_greedy, encode, frame, one_group, sample_seed

NEW_TOKENS = 32  # hub models: generated tokens (a 7-digit value, with room for a short sentence)
COLUMNS = ("depth", "depth_actual", "needle_position", "prediction", "expected", "score", "query_first")


def depths(n: int) -> list[float]:
    """n evenly spaced depths from 0 (start of the context) to 1 (its end)."""
    if n < 2:
        raise ValueError(f"n_depths must be at least 2 (depths 0 and 1), got {n}")
    return [i / (n - 1) for i in range(n)]


def doc_depth(doc: dict, n_depths: int) -> float:
    return depths(n_depths)[int(doc["id"]) % n_depths]


def score(prediction: str, expected: str) -> float:
    from ..longctx.scoring import needle_exact_match

    return needle_exact_match(prediction, expected)


def closest_boundary(counts: list[int], depth: float) -> int:
    """The sentence boundary whose share of the filler tokens before it is closest to `depth` (ties:
    the earlier one), as `longctx.haystack` places its needle."""
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    total = cum[-1]
    return min(range(len(cum)), key=lambda i: (abs((cum[i] / total if total else 0.0) - depth), i))


# ---- hub models --------------------------------------------------------------------------------
def hub_sample(prompter, doc: dict, depth: float, query_first: bool) -> Sample:
    from ..longctx.haystack import TextFiller, needle_sample
    from ..streams import ROLE_INSTR, ROLE_SOURCE

    head, tail = frame(prompter)
    room = int(doc["length"]) - len(head) - len(tail) - NEW_TOKENS
    s = needle_sample(counter(prompter), length=room, depth=100 * depth, seed=sample_seed(doc), index=int(doc["id"]),
                      filler=TextFiller([doc["source"]]), query_first=query_first)
    before = encode(prompter, s.before)
    needle = encode(prompter, (" " if s.before else "") + s.needle)
    after = encode(prompter, (" " if s.before or s.needle else "") + s.after) if s.after else []
    context = before + needle + after
    if query_first:  # [head question \n] [context] [tail]
        parts = [head + encode(prompter, s.question + s.sep), context, tail]
        roles = [ROLE_SOURCE, ROLE_SOURCE, ROLE_INSTR]
        at = len(parts[0]) + len(before)
    else:  # [head context] [\n question tail]
        parts, roles = [head + context, encode(prompter, s.sep + s.question) + tail], [ROLE_SOURCE, ROLE_SOURCE]
        at = len(head) + len(before)
    feeds = one_group(parts, roles)
    n = sum(len(p) for p in parts)
    return Sample(feeds, next_pos=n, gen_role=ROLE_SOURCE, n_new=NEW_TOKENS, needle=list(range(at, at + len(needle))),
                  info=dict(depth=depth, depth_actual=s.actual_depth, needle_position=at, expected=s.answer))


# ---- the builtin model -------------------------------------------------------------------------
def builtin_sample(prompter, doc: dict, depth: float, query_first: bool, k: int, target_offset: int) -> Sample:
    from .. import streams, synth
    from ..streams import ROLE_SOURCE, ROLE_TARGET

    lex = synth.lexicon()
    src, tgt = doc["source"].split(), (doc.get("target") or "").split()
    ends = doc.get("sent_ends") or []
    bad = set(lex.src["role"]) | set(lex.src["called"])
    if len(src) != len(tgt) or not ends or ends[-1] != len(src) or bad & set(src):
        raise ValueError(f"sample {doc['id']}: niah on the builtin model reads the filler of a `source: haystack` "
                         "dataset (sentence pairs of the builtin language without name bindings)")
    if k < 2:
        raise ValueError(f"niah on the builtin model needs wait_k >= 2 (the role is read before its name is "
                         f"written), got {k}")
    sents = [(src[a:b], tgt[a:b]) for a, b in zip([0] + ends[:-1], ends)]
    rng = random.Random(sample_seed(doc))
    role, f, last = rng.randrange(synth.N_ROLE), rng.randrange(synth.N_FIRST), rng.randrange(synth.N_LAST)
    S, T = lex.src, lex.tgt
    needle_s = [S["det"][0], S["role"][role], S["cop"][0], S["called"][0], lex.first[role][f], lex.last[role][last],
                "."]
    needle_t = [T["det"][0], T["role"][role], T["cop"][0], T["called"][0], lex.tfirst[role][f],
                lex.tlast[role][last], "."]
    subj_s, subj_t = synth._noun_phrase(rng, lex)
    v, p = rng.randrange(synth.N_VERB), rng.randrange(synth.N_PREP)
    q_s = subj_s + [S["verb"][v], S["prep"][p], S["det"][0], S["role"][role], "."]
    q_prefix = subj_t + [T["verb"][v], T["prep"][p]]  # then the name "FIRSTx LASTx" (the reference)
    expected = f"{lex.tfirst[role][f]} {lex.tlast[role][last]}"
    vocab = prompter.tok.get_vocab()
    ids = lambda words: [vocab[w] for w in words]  # noqa: E731 - one token per word
    instr = prompter.instruction() + (ids(q_s) if query_first else [])

    def build(n: int):
        at = closest_boundary([len(s) for s, _ in sents[:n]], depth)
        cs = [w for s, _ in sents[:at] for w in s] + needle_s + [w for s, _ in sents[at:n] for w in s]
        ct = [w for _, t in sents[:at] for w in t] + needle_t + [w for _, t in sents[at:n] for w in t]
        tgt_words = [prompter.target_start()] + [[i] for i in ids(ct + q_prefix)]
        st = streams.build_stream(instr, [[i] for i in ids(cs + q_s)], tgt_words, k, target_offset)
        cut = max(i for i, r in enumerate(st.role) if r == ROLE_TARGET) + 1  # the stream ends where the name is due
        return st, cut, at, cs

    n = len(sents)
    while True:
        st, cut, at, cs = build(n)
        if cut + 1 <= int(doc["length"]) or n == 0:  # + the first name token, fed back
            break
        n -= 1
    if cut + 1 > int(doc["length"]):
        raise ValueError(f"sample {doc['id']}: length {doc['length']} cannot hold the needle and the question")
    n_before = sum(len(s) for s, _ in sents[:at])
    src_idx = [i for i, r in enumerate(st.role) if r == ROLE_SOURCE]  # stream index of each source word
    tgt_idx = [i for i, r in enumerate(st.role) if r == ROLE_TARGET]
    ctx_words = len(cs)
    if len(src_idx) <= ctx_words + len(q_s) - 2 or src_idx[ctx_words + len(q_s) - 2] >= cut:
        raise ValueError(f"sample {doc['id']}: the role of the question is not read before its name is written")
    needle = src_idx[n_before:n_before + len(needle_s)] + tgt_idx[1 + n_before:1 + n_before + len(needle_t)]
    q0 = src_idx[ctx_words]  # the question's first token: the context is everything before it
    feeds = [(st.ids[:q0], st.pos[:q0], st.role[:q0]), (st.ids[q0:cut], st.pos[q0:cut], st.role[q0:cut])]
    total = sum(len(s) for s, _ in sents[:n])
    return Sample(feeds, next_pos=st.pos[cut - 1] + 1, gen_role=ROLE_TARGET, n_new=2, needle=needle,
                  info=dict(depth=depth, depth_actual=n_before / total if total else 0.0,
                            needle_position=needle[0], expected=expected))


@register
@dataclass(frozen=True)
class Niah(AccuracyCells, TargetGroup, WaitK):
    name = "niah"
    order = 5
    summary = "needle in a haystack: a value retrieved from depth d of the context"
    kinds = ("haystack",)
    columns = COLUMNS
    reads_context = True
    answer_tokens = NEW_TOKENS

    n_depths: int = param(5, minimum=2, help="needle depths 0, 1/(n-1), ..., 1 of the context; document i takes "
                                            "depth i mod n")
    query_first: bool = param(False, help="the question before the context (for query-aware methods); labelled "
                                         "in every row")

    def sample(self, prompter, doc: dict) -> Sample:
        d = doc_depth(doc, self.n_depths)
        if prompter.builtin:
            return builtin_sample(prompter, doc, d, self.query_first, self.wait_k, self.target_offset)
        return hub_sample(prompter, doc, d, self.query_first)

    def positions(self, prompter, doc: dict) -> tuple[int, int]:
        s = self.sample(prompter, doc)
        return s.n_tokens + s.n_new - 1, s.positions_needed()

    def run(self, session, prompter, doc: dict) -> dict:
        s = self.sample(prompter, doc)
        prediction = prompter.decode(decode_greedy(session, prompter, s))
        return dict(s.info, prediction=prediction, score=score(prediction, s.info["expected"]),
                    query_first=self.query_first)
