"""Needle-in-a-haystack samples: one needle sentence (a key and its value) at a chosen depth in filler.

Pure and offline: no model, no tokenizer of our own. Lengths are token targets under a caller-supplied
counter `count(text) -> int`, so one generator serves every tokenizer (a whitespace counter in tests, a
HF tokenizer's `len(tok(text).input_ids)` in a run).

    from kvbench.longctx.haystack import needle_sample, TextFiller
    s = needle_sample(lambda t: len(t.split()), length=2000, depth=35, seed=0)
    s.prompt, s.answer, s.actual_depth   # the text to feed, the value to find, where it really landed

Layout of a sample (`query_first=False`, the default: the question comes after the context, so a cache
is compressed before the question is seen, as in real multi-turn use):

    [filler sentences before] [needle sentence] [filler sentences after] \n [question]

Depth d (percent) puts the needle at the sentence boundary whose share of the filler tokens before it
is closest to d/100 (ties go to the earlier boundary); d=0 is before the first sentence, d=100 after
the last. `actual_depth` reports that share, so a heatmap can plot where the needle really is.
Sentence token counts are `count(sentence)` per sentence (a BPE tokenizer may merge across a space, so
this is the depth as a fraction of filler tokens up to that approximation).

The whole prompt (context, separator and question) is the largest that fits in `length` tokens:
`length - n_tokens` is below the token count of one filler sentence (plus the separator's) unless the
filler ran out, which raises instead of repeating text.

Seeding: a sample depends on (seed, length, index) only, not on the depth, so the same haystack and
the same needle appear at every depth of a grid row: only the position changes across the heatmap.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

Counter = Callable[[str], int]

NEEDLE = "The special magic number for {key} is {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
SEP = "\n"  # between the context and the question

# Keys are hyphenated colour-animal pairs: the filler vocabulary never holds a hyphen, so a key can
# only occur in the needle (and the question).
KEY_ADJECTIVES = ("amber", "azure", "coral", "crimson", "copper", "golden", "ivory", "jade", "lilac", "maroon",
                  "ochre", "olive", "pearl", "russet", "sable", "scarlet", "silver", "teal", "umber", "violet")
KEY_NOUNS = ("badger", "beetle", "bison", "condor", "falcon", "gecko", "heron", "ibis", "jackal", "lynx",
             "marten", "newt", "otter", "panther", "puffin", "salmon", "tapir", "walrus", "weasel", "wren")

# A small English vocabulary for the synthetic filler, written for this module. No digits anywhere,
# so a numeric needle value is unique in the context.
_NOUNS = ("farmer", "river", "teacher", "market", "village", "garden", "engineer", "painter", "harbor",
          "library", "baker", "forest", "student", "orchard", "bridge", "traveler", "kitchen", "museum",
          "sailor", "meadow", "doctor", "tailor", "valley", "workshop", "neighbor", "musician", "shepherd",
          "lantern", "carpenter", "island", "station", "cottage", "council", "pilot", "fountain", "theater")
_ADJECTIVES = ("quiet", "old", "busy", "small", "bright", "patient", "careful", "distant", "gentle", "narrow",
               "green", "tired", "cheerful", "heavy", "wooden", "early", "modest", "curious", "calm", "crowded")
_VERBS = ("visited", "painted", "repaired", "watched", "crossed", "described", "measured", "cleaned",
          "followed", "admired", "opened", "carried", "planted", "studied", "remembered", "ignored")
_WHEN = ("dawn", "noon", "dusk", "midnight", "supper", "the first frost", "the long holiday")
_SEASONS = ("morning", "evening", "spring", "autumn", "winter", "summer", "market day")
_TEMPLATES = (
    "The {a} {n} {v} the {m} before {w}.",
    "Every {s}, a {a} {n} walked slowly past the {m}.",
    "Nobody in the {n} expected the {m} to look so {b}.",
    "A {n} near the {m} was {a} and {b}.",
    "The {m} {v} a {a} {n} after the rain had stopped.",
    "Some people said that the {n} {v} the {b} {m} twice.",
    "In the {a} {n}, the {m} stayed {b} for the whole {s}.",
    "Later that {s}, the {n} {v} the {m} with great care.",
    "It was {a} in the {n} when the {m} finally {v} it.",
    "The {b} {m} and the {a} {n} were talked about until {w}.",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class SyntheticFiller:
    """Plain English sentences from a small vocabulary and a few templates, endless and seeded."""

    def sentences(self, rng: random.Random) -> Iterator[str]:
        while True:
            template = rng.choice(_TEMPLATES)
            n, m = rng.sample(_NOUNS, 2)
            a, b = rng.sample(_ADJECTIVES, 2)
            yield template.format(n=n, m=m, a=a, b=b, v=rng.choice(_VERBS), w=rng.choice(_WHEN),
                                  s=rng.choice(_SEASONS))


@dataclass(frozen=True)
class TextFiller:
    """Sentences of a list of texts (a dataset's text column), in a seeded order of the texts.

    Each text is cut at sentence ends (`.`, `!`, `?` followed by whitespace) and its whitespace collapsed
    to single spaces. The stream ends with the last text: a haystack that needs more raises, it never
    repeats text.
    """

    texts: tuple[str, ...]

    def __init__(self, texts: Iterable[str]):
        texts = tuple(texts)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("TextFiller takes strings (a dataset's text column)")
        if not any(t.strip() for t in texts):
            raise ValueError("empty filler: TextFiller needs at least one non-blank text")
        object.__setattr__(self, "texts", texts)

    def sentences(self, rng: random.Random) -> Iterator[str]:
        order = list(range(len(self.texts)))
        rng.shuffle(order)
        for i in order:
            for sentence in _SENTENCE_END.split(self.texts[i]):
                sentence = " ".join(sentence.split())
                if sentence:
                    yield sentence


Filler = SyntheticFiller | TextFiller


class _Stream:
    """A sentence stream materialised on demand, with each sentence's token count cached."""

    def __init__(self, sentences: Iterator[str], count: Counter):
        self._it, self._count = sentences, count
        self.items: list[str] = []
        self.tokens: list[int] = []
        self.exhausted = False

    def has(self, n: int) -> bool:
        while len(self.items) < n and not self.exhausted:
            s = next(self._it, None)
            if s is None:
                self.exhausted = True
            else:
                self.items.append(s)
                self.tokens.append(self._count(s))
        return len(self.items) >= n


def largest_fitting(fits: Callable[[int], bool], lo: int = 0) -> int:
    """The largest n >= lo with fits(n), for fits true up to some n and false after; lo - 1 if none.

    Doubling then bisection: O(log n) calls, each of which may count a whole prompt.
    """
    if not fits(lo):
        return lo - 1
    good, step = lo, 1
    while fits(good + step):
        good += step
        step *= 2
    bad = good + step
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


@dataclass(frozen=True)
class NeedleSample:
    """One needle-in-a-haystack prompt, in parts (so a task can label roles) and assembled.

    `depth` is the requested depth and `actual_depth` the share of filler tokens before the needle,
    both fractions in [0, 1]; `n_tokens` is `count(prompt)`; `length` the target it was built for.
    """

    before: str
    needle: str
    after: str
    question: str
    key: str
    answer: str
    depth: float
    actual_depth: float
    n_tokens: int
    length: int
    query_first: bool
    sep: str = SEP

    @property
    def context_parts(self) -> tuple[str, str, str]:
        return self.before, self.needle, self.after

    @property
    def context(self) -> str:
        return " ".join(p for p in self.context_parts if p)

    @property
    def parts(self) -> tuple[str, str]:
        """(context, question), or (question, context) with `query_first`."""
        return (self.question, self.context) if self.query_first else (self.context, self.question)

    @property
    def prompt(self) -> str:
        return self.sep.join(self.parts)


def random_key(rng: random.Random) -> str:
    return f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}"


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def check_length(length) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive number of tokens, got {length!r}")
    return length


def needle_sample(count: Counter, *, length: int, depth: float, seed: int = 0, index: int = 0,
                  filler: Filler | None = None, query_first: bool = False, needle: str = NEEDLE,
                  question: str = QUESTION) -> NeedleSample:
    """A needle sample of at most `length` tokens under `count`, the needle at `depth` percent.

    `needle` and `question` are templates with `{key}` (and `{value}` for the needle). The key is a
    colour-animal pair, the value a 7-digit number that does not occur in the filler.
    """
    check_length(length)
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or math.isnan(depth) \
            or not 0 <= depth <= 100:
        raise ValueError(f"depth must be a percentage within [0, 100], got {depth!r}")
    filler = SyntheticFiller() if filler is None else filler
    rng = random.Random(f"niah|{seed}|{length}|{index}")
    key = random_key(rng)
    stream = _Stream(filler.sentences(random.Random(rng.getrandbits(64))), count)
    value_rng = random.Random(rng.getrandbits(64))
    q = question.format(key=key)

    value = random_number(value_rng)
    fixed = count(SEP.join([needle.format(key=key, value=value), q]))
    if fixed > length:
        raise ValueError(f"length {length} is too short to hold the needle and the question ({fixed} tokens)")

    def build(n: int, value: str) -> NeedleSample:
        tokens = stream.tokens[:n]
        total = sum(tokens)
        cum = [0]
        for t in tokens:
            cum.append(cum[-1] + t)
        target = depth / 100
        # the boundary whose filler share is closest to the target; the earlier one on a tie
        at = min(range(n + 1), key=lambda i: (abs((cum[i] / total if total else 0.0) - target), i))
        return NeedleSample(
            before=" ".join(stream.items[:at]), needle=needle.format(key=key, value=value),
            after=" ".join(stream.items[at:n]), question=q, key=key, answer=value, depth=target,
            actual_depth=cum[at] / total if total else 0.0, n_tokens=-1, length=length, query_first=query_first)

    def fits(n: int) -> bool:
        return stream.has(n) and count(build(n, value).prompt) <= length

    for _ in range(100):  # a dataset filler may hold the drawn number: draw another
        n = largest_fitting(fits, 1)
        if n < 1:
            raise ValueError(f"length {length} leaves no room for a filler sentence around the needle "
                             f"(needle and question alone take {fixed} tokens)")
        if stream.exhausted and n == len(stream.items):
            raise ValueError(f"the filler ran out: all its {n} sentences fit in {length} tokens; "
                             "give more texts or a shorter length")
        sample = build(n, value)
        if value not in sample.before and value not in sample.after:
            break
        value = random_number(value_rng)
    else:
        raise ValueError("could not draw a needle value absent from the filler")
    return _with_tokens(sample, count)


def _with_tokens(sample: NeedleSample, count: Counter) -> NeedleSample:
    return replace(sample, n_tokens=count(sample.prompt))


def needle_grid(count: Counter, *, lengths: Sequence[int], depths: Sequence[float], n: int, seed: int = 0,
                filler: Filler | None = None, query_first: bool = False) -> list[NeedleSample]:
    """`n` samples per (length, depth) cell, ordered by length, then depth, then index.

    Sample i of a length has the same haystack and needle at every depth (see the module docstring).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1 sample per cell, got {n!r}")
    return [needle_sample(count, length=length, depth=depth, seed=seed, index=i, filler=filler,
                          query_first=query_first)
            for length in lengths for depth in depths for i in range(n)]
