"""The synthetic language pair the offline default is built on (see shared BUILTIN_MODEL.md).

Two made-up languages of consonant-vowel pseudo-words with a word-level dictionary, one reordering
rule (adjective-noun swap) and a long-range dependency: binding sentences early in a document
("the ROLE is called FIRST LAST .") and later references ("the ROLE ...") whose translation is the
bound name (in its target form: names are transliterated with the target marker "x"). Names come
from role-specific pools of 4 first + 4 last names, so a model without the binding in its cache
guesses each name with probability 1/4; that is what separates KV policies.

Every target sentence has exactly as many words as its source sentence (the reference translation
of "the ROLE" is "FIRSTx LASTx"), so word alignment is monotone up to the local adjective swap and
wait-k latency is meaningful. One word = one token with the builtin tokenizer.

The language itself is fixed (LANGUAGE_SEED); documents are drawn from a caller's seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

LANGUAGE_SEED = 20261122
SRC_LANG, TGT_LANG = "syn_src", "syn_tgt"
INSTRUCTION = ["translate", SRC_LANG, "to", TGT_LANG, ":"]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<tgt>"]
TARGET_START = "<tgt>"
N_NOUN, N_ADJ, N_VERB, N_PREP, N_ROLE, N_FIRST, N_LAST = 60, 30, 30, 8, 16, 4, 4


@dataclass
class Lexicon:
    src: dict[str, list[str]] = field(default_factory=dict)  # class -> words
    tgt: dict[str, list[str]] = field(default_factory=dict)
    first: list[list[str]] = field(default_factory=list)  # per role: first-name pool (source forms)
    last: list[list[str]] = field(default_factory=list)
    tfirst: list[list[str]] = field(default_factory=list)  # the same names' target-language forms
    tlast: list[list[str]] = field(default_factory=list)

    def vocabulary(self) -> list[str]:
        words = SPECIALS + INSTRUCTION + ["."]
        for lang in (self.src, self.tgt):
            for cls in sorted(lang):
                words += lang[cls]
        for pool in self.first + self.last + self.tfirst + self.tlast:
            words += pool
        seen: set[str] = set()
        return [w for w in words if not (w in seen or seen.add(w))]


def _make_words(rng: random.Random, n: int, consonants: str, vowels: str, syl: tuple[int, int],
                taken: set[str], capital: bool = False) -> list[str]:
    out = []
    while len(out) < n:
        w = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(*syl)))
        if capital:
            w = w.capitalize()
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def lexicon() -> Lexicon:
    """The fixed lexicon (deterministic: same words on every machine)."""
    rng = random.Random(LANGUAGE_SEED)
    taken: set[str] = set(INSTRUCTION)
    lex = Lexicon()
    sizes = {"noun": N_NOUN, "adj": N_ADJ, "verb": N_VERB, "prep": N_PREP, "role": N_ROLE}
    # source: soft consonants; target: hard consonants + a final "x" marker, so the sets never overlap
    for lang, cons, vow, suffix in ((lex.src, "bdfglmnrsv", "aeiou", ""), (lex.tgt, "kptzhjwc", "aeiouy", "x")):
        lang["det"] = ["ka" + suffix] if suffix else ["ka"]
        lang["cop"] = ["esi" + suffix]
        lang["called"] = ["namo" + suffix]
        taken.update(lang["det"] + lang["cop"] + lang["called"])
        for cls, n in sizes.items():
            lang[cls] = [w + suffix for w in _make_words(rng, n, cons, vow, (2, 3), taken)]
            taken.update(lang[cls])
    for _ in range(N_ROLE):
        lex.first.append(_make_words(rng, N_FIRST, "BDGKLMNPRST".lower(), "aeiou", (2, 2), taken, capital=True))
        lex.last.append(_make_words(rng, N_LAST, "BDGKLMNPRST".lower(), "aeiou", (3, 3), taken, capital=True))
    # Target-language forms carry the target marker "x" (source names never contain an x). Without
    # them a name token is the only word shared by both sides, so under GPE (both sides share
    # positions) a model cannot tell from the token whether a name is being read or written.
    lex.tfirst = [[w + "x" for w in pool] for pool in lex.first]
    lex.tlast = [[w + "x" for w in pool] for pool in lex.last]
    return lex


@dataclass
class Document:
    id: int
    source: list[str]
    target: list[str]
    sent_ends: list[int]  # word index (exclusive) where each sentence ends, same on both sides

    def n_tokens(self) -> int:
        """Stream length with the builtin tokenizer: <bos> + instruction + source + <tgt> + target."""
        return 1 + len(INSTRUCTION) + len(self.source) + len(self.target) + 1


def _noun_phrase(rng: random.Random, lex: Lexicon) -> tuple[list[str], list[str]]:
    n = rng.randrange(N_NOUN)
    s, t = [lex.src["det"][0]], [lex.tgt["det"][0]]
    if rng.random() < 0.5:
        a = rng.randrange(N_ADJ)
        return s + [lex.src["adj"][a], lex.src["noun"][n]], t + [lex.tgt["noun"][n], lex.tgt["adj"][a]]
    return s + [lex.src["noun"][n]], t + [lex.tgt["noun"][n]]


def _sentence(rng: random.Random, lex: Lexicon, bound: dict[int, tuple[int, int]], free: list[int]):
    """One sentence pair. Returns (src, tgt, newly bound role or None)."""
    r = rng.random()
    if free and (not bound or r < 0.25):
        role = free[rng.randrange(len(free))]
        f, l = rng.randrange(N_FIRST), rng.randrange(N_LAST)
        s = [lex.src["det"][0], lex.src["role"][role], lex.src["cop"][0], lex.src["called"][0],
             lex.first[role][f], lex.last[role][l], "."]
        t = [lex.tgt["det"][0], lex.tgt["role"][role], lex.tgt["cop"][0], lex.tgt["called"][0],
             lex.tfirst[role][f], lex.tlast[role][l], "."]
        return s, t, (role, (f, l))
    v, p = rng.randrange(N_VERB), rng.randrange(N_PREP)
    subj = _noun_phrase(rng, lex)
    obj = _noun_phrase(rng, lex)
    roles = list(bound)
    if roles and r < 0.8:  # reference: "the ROLE" -> "FIRST LAST", as subject or object
        role = roles[rng.randrange(len(roles))]
        f, l = bound[role]
        ref = ([lex.src["det"][0], lex.src["role"][role]], [lex.tfirst[role][f], lex.tlast[role][l]])
        if rng.random() < 0.5:
            subj = ref
        else:
            obj = ref
    s = subj[0] + [lex.src["verb"][v], lex.src["prep"][p]] + obj[0] + ["."]
    t = subj[1] + [lex.tgt["verb"][v], lex.tgt["prep"][p]] + obj[1] + ["."]
    return s, t, None


def make_document(doc_id: int, length: int, seed: int, lex: Lexicon | None = None,
                  n_roles: tuple[int, int] = (3, 8)) -> Document:
    """A document whose stream fits in `length` tokens (sentences appended until the next overflows)."""
    lex = lex or lexicon()
    rng = random.Random(f"{seed}:{doc_id}:{length}")
    roles = rng.sample(range(N_ROLE), rng.randint(*n_roles))
    bound: dict[int, tuple[int, int]] = {}  # role -> (first, last) index in its pools
    doc = Document(doc_id, [], [], [])
    overhead = Document(0, [], [], []).n_tokens()
    while True:
        free = [r for r in roles if r not in bound]
        s, t, b = _sentence(rng, lex, bound, free)
        if overhead + len(doc.source) + len(s) + len(doc.target) + len(t) > length:
            break
        doc.source += s
        doc.target += t
        doc.sent_ends.append(len(doc.source))
        if b is not None:
            bound[b[0]] = b[1]
    if not doc.source:
        raise ValueError(f"length {length} is too small for one sentence pair (needs about {overhead + 16} tokens)")
    return doc


def name_tokens(lex: Lexicon | None = None) -> set[str]:
    """Every name token, source and target forms."""
    lex = lex or lexicon()
    return {w for pool in lex.first + lex.last + lex.tfirst + lex.tlast for w in pool}
