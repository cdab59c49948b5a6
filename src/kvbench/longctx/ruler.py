"""A RULER subset, synthetic and seeded at token lengths: multi-key NIAH, multi-value NIAH, variable
tracking, common-words extraction.

Task definitions, prompt templates and answer formats follow RULER (Hsieh et al., 2024, "RULER: What's
the Real Context Size of Your Long-Context Language Models?", NVIDIA/RULER `scripts/data/synthetic/`):

- `niah_multikey`: RULER's niah_multikey_1 by default: four needles "One of the special magic numbers
  for {key} is: {value}." at depths drawn from RULER's 40-point grid, one key asked, the other three
  are distractors. `haystack="needles"` is niah_multikey_2/3: the haystack itself is distractor
  needles (keys and values drawn like the real ones; `key_type="uuids", value_type="uuids"` is _3).
- `niah_multivalue`: one key with four values, all asked (RULER niah_multivalue).
- `vt`: variable tracking; chains "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE ", ... (1 chain of 4 hops
  by default, other chains are distractors) hidden in RULER's repeated noise; the answer is every
  variable of the first chain. A one-shot example with 3-letter names comes first, as in RULER.
- `cwe`: a numbered word list where 10 words repeat `freq_cw` times (30; 6 below 4096 tokens) and
  the rest `freq_ucw` times (3; 1 below 4096); the answer is the 10 common words. One-shot example first.

Each sample is `context + question + answer_prefix` (RULER's `input`, the answer prefix last), its
reference answers (RULER's `outputs`) and `length = count(input) + tokens_to_generate` (RULER's
`length`, never above the target). Scored by `scoring.string_match_all`, as RULER scores all four.

Where this differs from RULER, on purpose:
- The NIAH haystack is our filler (`haystack.SyntheticFiller`, or a dataset's text via `TextFiller`),
  not Paul Graham's essays; keys are our colour-animal pairs, not wonderwords adjective-noun pairs.
- The CWE words are generated three-syllable pseudo-words (e.g. "bakumo"), all the same length, so no
  word is a substring of another and substring scoring cannot give credit by accident.
- VT's answer prefix reads "assigned" (RULER's first release had the typo "assgined").
- The haystack size is found by bisection on the counted prompt instead of RULER's fixed increments;
  both give the largest haystack whose `length` fits the target.
"""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from .haystack import KEY_ADJECTIVES, KEY_NOUNS, Counter, Filler, SyntheticFiller, _Stream, check_length, \
    largest_fitting

# RULER evaluates needle depths on a 40-point grid: round(linspace(0, 100, 40)).
DEPTHS = tuple(int(round(100 * i / 39)) for i in range(40))

# RULER's "repeat" noise, used by its variable-tracking task (and niah_single_1).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

NIAH_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NIAH_INTRO = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the {type_v} afterwards.\n")
NIAH_QUESTION = "What are all the special magic {type_v} for {query} mentioned in the provided text?"
NIAH_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"

VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
             "are assigned the value {query}, they are: ")

CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
CWE_QUESTION = "Question: What are the {num_cw} most common words in the above list?"
CWE_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"

TOKENS_TO_GENERATE = {"niah_multikey": 128, "niah_multivalue": 128, "vt": 30, "cwe": 120}
NEEDLE_TYPES = ("words", "numbers", "uuids")

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class RulerSample:
    """One RULER sample: `input` is what the model reads (the answer prefix last), `answers` RULER's
    `outputs`, `length` RULER's `length` (input tokens + tokens to generate)."""

    task: str
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    length: int
    target: int
    metric: str = "string_match_all"

    @property
    def input(self) -> str:
        return self.context + self.question + self.answer_prefix


def _needle_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))  # RULER: 7 digits
    if kind == "words":
        return f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle type must be one of {NEEDLE_TYPES}, got {kind!r}")


def _distinct(rng: random.Random, kind: str, n: int, avoid: set[str] = frozenset()) -> list[str]:
    out: list[str] = []
    seen = set(avoid)
    for _ in range(1000 * n + 1000):
        if len(out) == n:
            return out
        v = _needle_value(rng, kind)
        if v not in seen:
            seen.add(v)
            out.append(v)
    raise ValueError(f"cannot draw {n} distinct {kind}")


def _fit(task: str, count: Counter, length: int, tokens_to_generate: int, build: Callable[[int], RulerSample | None],
         lo: int, unit: str) -> tuple[RulerSample, int]:
    """The sample of the largest haystack size n >= lo whose input fits `length - tokens_to_generate`, and n."""
    check_length(length)
    budget = length - tokens_to_generate
    cache: dict[int, RulerSample | None] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = build(n)
        s = cache[n]
        return s is not None and count(s.input) <= budget

    n = largest_fitting(fits, lo)
    if n < lo:
        raise ValueError(f"{task}: length {length} (with {tokens_to_generate} tokens to generate) is too short "
                         f"for the smallest sample ({lo} {unit})")
    s = cache[n]
    return replace(s, length=count(s.input) + tokens_to_generate, target=length), n


def niah(count: Counter, *, length: int, seed: int = 0, index: int = 0, num_keys: int = 1, num_values: int = 1,
         num_queries: int = 1, haystack: str = "filler", key_type: str = "words", value_type: str = "numbers",
         filler: Filler | None = None, task: str = "niah", tokens_to_generate: int = 128) -> RulerSample:
    """RULER's NIAH family. `haystack`: "filler" (sentences, needles at sampled depths) or "needles"
    (distractor needles, one per line, real needles at random lines)."""
    if haystack not in ("filler", "needles"):
        raise ValueError(f"haystack must be 'filler' or 'needles', got {haystack!r}")
    for name, kind in (("key_type", key_type), ("value_type", value_type)):
        if kind not in NEEDLE_TYPES:
            raise ValueError(f"{name} must be one of {NEEDLE_TYPES}, got {kind!r}")
    if min(num_keys, num_values, num_queries) < 1 or num_queries > num_keys:
        raise ValueError(f"need 1 <= num_queries <= num_keys and num_values >= 1, got keys {num_keys}, "
                         f"values {num_values}, queries {num_queries}")
    rng = random.Random(f"ruler|{task}|{seed}|{length}|{index}")
    keys = _distinct(rng, key_type, num_keys)
    values = [_distinct(rng, value_type, num_values) for _ in keys]
    needles = [NIAH_NEEDLE.format(type_v=value_type, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    asked = sorted(rng.sample(range(num_keys), num_queries))
    answers = tuple(v for i in asked for v in values[i])
    query = keys[asked[0]] if num_queries == 1 else ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]]
    type_v, intro, question, prefix = value_type, NIAH_INTRO, NIAH_QUESTION, NIAH_PREFIX
    if num_queries * num_values == 1:  # RULER's singular wording for a single answer
        type_v = value_type[:-1]
        intro = intro.replace("Some", "A").replace("are", "is")
        question = question.replace("are all", "is")
        prefix = prefix.replace("are", "is")
    head = intro.format(type_v=type_v)
    question = question.format(type_v=type_v, query=query)
    prefix = prefix.format(type_v=type_v, query=query)
    hay_seed = rng.getrandbits(64)
    stream = None
    if haystack == "filler":
        stream = _Stream((SyntheticFiller() if filler is None else filler).sentences(random.Random(hay_seed)),
                         lambda s: 0)

    def build(n: int) -> RulerSample | None:
        r = random.Random(hay_seed + 1)
        if haystack == "filler":
            if not stream.has(n):
                return None
            sents = stream.items[:n]
            at = [0] + sorted(int(n * d / 100) for d in r.sample(DEPTHS, len(needles))) + [n]
            pieces = []
            for i in range(1, len(at)):
                pieces.append(" ".join(sents[at[i - 1]:at[i]]))
                if i - 1 < len(needles):
                    pieces.append(needles[i - 1])
            body = " ".join(p for p in pieces if p)
        else:
            if n < len(needles):
                return None
            lines = [NIAH_NEEDLE.format(type_v=value_type, key=k, value=_needle_value(r, value_type))
                     for k in _distractor_keys(r, key_type, n, set(keys))]
            for i, needle in zip(sorted(r.sample(range(n), len(needles)), reverse=True), needles):
                lines.insert(i, needle)
            body = "\n".join(lines)
        return RulerSample(task=task, context=head + body + "\n", question=question, answer_prefix=prefix,
                           answers=answers, length=0, target=length)

    s, n = _fit(task, count, length, tokens_to_generate, build, 1 if haystack == "filler" else len(needles),
                "sentences" if haystack == "filler" else "needles")
    if haystack == "filler" and stream.exhausted and n == len(stream.items):
        raise ValueError(f"{task}: the filler ran out: all its {len(stream.items)} sentences fit in {length} "
                         "tokens; give more texts or a shorter length")
    return s


def _distractor_keys(rng: random.Random, kind: str, n: int, avoid: set[str]) -> list[str]:
    # distractors may repeat one another (as in RULER) but never a real key
    out = []
    while len(out) < n:
        k = _needle_value(rng, kind)
        if k not in avoid:
            out.append(k)
    return out


def niah_multikey(count: Counter, *, length: int, seed: int = 0, index: int = 0, num_keys: int = 4,
                  haystack: str = "filler", key_type: str = "words", value_type: str = "numbers",
                  filler: Filler | None = None) -> RulerSample:
    """Multi-key NIAH: `num_keys` needles, one key asked (RULER niah_multikey_1/2/3, see module doc)."""
    return niah(count, length=length, seed=seed, index=index, num_keys=num_keys, haystack=haystack,
                key_type=key_type, value_type=value_type, filler=filler, task="niah_multikey",
                tokens_to_generate=TOKENS_TO_GENERATE["niah_multikey"])


def niah_multivalue(count: Counter, *, length: int, seed: int = 0, index: int = 0, num_values: int = 4,
                    filler: Filler | None = None) -> RulerSample:
    """Multi-value NIAH: one key with `num_values` values, all of them asked (RULER niah_multivalue)."""
    return niah(count, length=length, seed=seed, index=index, num_values=num_values, filler=filler,
                task="niah_multivalue", tokens_to_generate=TOKENS_TO_GENERATE["niah_multivalue"])


def _chains(rng: random.Random, num_chains: int, num_hops: int,
            letters: int) -> tuple[list[list[str]], list[list[str]]]:
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        v = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if v not in names:
            names.append(v)
    variables, chains = [], []
    for c in range(num_chains):
        vs = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        variables.append(vs)
        chain = [f"VAR {vs[0]} = {rng.randint(10000, 99999)}"]
        chain += [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(num_hops)]
        chains.append(chain)
    return variables, chains


def _vt_body(rng: random.Random, n: int, chains: list[list[str]]) -> str | None:
    if n < len(chains[0]):
        return None
    sentences = [NOISE + "\n"] * n
    for chain in chains:
        where = sorted(rng.sample(range(len(sentences)), len(chain)))
        for j, (pos, statement) in enumerate(zip(where, chain)):
            sentences.insert(pos + j, statement)
    return " ".join(sentences).replace(". \n", ".\n")


def vt(count: Counter, *, length: int, seed: int = 0, index: int = 0, num_chains: int = 1, num_hops: int = 4,
       fewshot: bool = True) -> RulerSample:
    """Variable tracking (multi-hop): find every variable assigned the first chain's value."""
    if num_chains < 1 or num_hops < 1:
        raise ValueError(f"num_chains and num_hops must be >= 1, got {num_chains}, {num_hops}")
    rng = random.Random(f"ruler|vt|{seed}|{length}|{index}")
    example = ""
    if fewshot:  # RULER's one-shot example: 3-letter names, fitted to 500 tokens
        ex_vars, ex_chains = _chains(rng, num_chains, min(10, num_hops), 3)
        ex_seed = rng.getrandbits(64)

        def ex_build(n: int) -> RulerSample | None:
            body = _vt_body(random.Random(ex_seed), n, ex_chains)
            return None if body is None else _vt_sample("", body, ex_vars[0], ex_chains[0], 0)

        ex, _ = _fit("vt example", count, 500, TOKENS_TO_GENERATE["vt"], ex_build, len(ex_chains[0]), "noise blocks")
        example = ex.input + " " + " ".join(ex.answers) + "\n\n"
    variables, chains = _chains(rng, num_chains, num_hops, 5)
    hay_seed = rng.getrandbits(64)

    def build(n: int) -> RulerSample | None:
        body = _vt_body(random.Random(hay_seed), n, chains)
        return None if body is None else _vt_sample(example, body, variables[0], chains[0], length)

    return _fit("vt", count, length, TOKENS_TO_GENERATE["vt"], build, num_hops + 1, "noise blocks")[0]


def _vt_sample(example: str, body: str, variables: list[str], chain: list[str], target: int) -> RulerSample:
    value = chain[0].split("=")[-1].strip()
    return RulerSample(task="vt", context=example + VT_INTRO + body + "\n",
                       question=VT_QUESTION.format(query=value),
                       answer_prefix=VT_PREFIX.format(num_v=len(variables), query=value),
                       answers=tuple(variables), length=0, target=target)


def _pseudo_words(rng: random.Random, n: int) -> list[str]:
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    picks = rng.sample(range(len(syllables) ** 3), n)
    k = len(syllables)
    return [syllables[i // (k * k)] + syllables[(i // k) % k] + syllables[i % k] for i in picks]


def _cwe_list(rng: random.Random, num_words: int, freq_cw: int, freq_ucw: int, num_cw: int) -> tuple[str, list[str]]:
    words = _pseudo_words(rng, num_words)
    common, uncommon = words[:num_cw], words[num_cw:]
    listed = common * freq_cw + uncommon * freq_ucw
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common


def cwe(count: Counter, *, length: int, seed: int = 0, index: int = 0, freq_cw: int = 30, freq_ucw: int = 3,
        num_cw: int = 10, fewshot: bool = True) -> RulerSample:
    """Common-words extraction (aggregation): name the `num_cw` words repeated most often."""
    if num_cw < 1 or freq_cw <= freq_ucw or freq_ucw < 1:
        raise ValueError(f"need num_cw >= 1 and freq_cw > freq_ucw >= 1, got {num_cw}, {freq_cw}, {freq_ucw}")
    if length < 4096:  # RULER's short-context setting
        example_args, freq_cw, freq_ucw = (20, 3, 1), 6, 1
    else:
        example_args = (40, 10, 3)
    rng = random.Random(f"ruler|cwe|{seed}|{length}|{index}")
    question = CWE_QUESTION.format(num_cw=num_cw)
    prefix = CWE_PREFIX.format(num_cw=num_cw)
    example = ""
    if fewshot:
        ex_text, ex_common = _cwe_list(rng, example_args[0], example_args[1], example_args[2], num_cw)
        example = (CWE_INTRO + ex_text + "\n" + question + prefix + " "
                   + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_common)) + "\n")
    list_seed = rng.getrandbits(64)

    def build(n: int) -> RulerSample:
        text, common = _cwe_list(random.Random(list_seed), n, freq_cw, freq_ucw, num_cw)
        return RulerSample(task="cwe", context=example + CWE_INTRO + text + "\n", question=question,
                           answer_prefix=prefix, answers=tuple(common), length=0, target=length)

    return _fit("cwe", count, length, TOKENS_TO_GENERATE["cwe"], build, num_cw + 1, "words")[0]


TASKS: dict[str, Callable[..., RulerSample]] = {
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "vt": vt,
    "cwe": cwe,
}


def generate(task: str, count: Counter, *, length: int, n: int, seed: int = 0, **options) -> list[RulerSample]:
    """`n` samples of one task at one token length; sample i depends on (task, seed, length, i) only."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known: {sorted(TASKS)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n!r}")
    return [TASKS[task](count, length=length, seed=seed, index=i, **options) for i in range(n)]
