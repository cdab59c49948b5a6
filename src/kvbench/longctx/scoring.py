"""The long-context benchmarks' own per-sample metrics, each pinned to its source's definition.

Every function scores ONE prediction and returns a float in [0, 1]; benchmarks report the mean over
samples x 100. Case handling and normalisation follow each source exactly and are stated per function;
where a source has a quirk that changes scores, we keep the quirk (so numbers compare with published
ones) and say so.

Sources:
- RULER (Hsieh et al., 2024), NVIDIA/RULER `scripts/eval/synthetic/constants.py`: string_match_all,
  string_match_part.
- LongBench (Bai et al., 2024), THUDM/LongBench `metrics.py` and `eval.py`: qa_f1 (SQuAD-style
  normalisation), rouge_l, classification, retrieval, count, code_sim; max over the reference answers;
  trec/triviaqa/samsum/lsht predictions cut to their first line first (`longbench_score`).
- InfiniteBench (Zhang et al., 2024), OpenBMB/InfiniteBench `src/compute_scores.py`: qa_f1 (En.QA),
  choice (En.MC), dialogue (En.Dia), first_int (passkey, number_string), kv_retrieval, rouge_lsum
  (En.Sum).
- LooGLE (Li et al., 2023), bigai-nlco/LooGLE `Evaluation/automatic_metrics.py`: of its automatic
  metrics, ROUGE-L (it reports the recall) for QA and summarisation, and exact / partial match for the
  cloze task. BLEU, METEOR and BERTScore are not reproduced here.

ROUGE comes from Google's `rouge-score` package (`pip install rouge-score==0.1.2`), never hand-written.
LongBench and LooGLE computed ROUGE with the older `rouge` package (pltrdy); `rouge-score` tokenises
differently (lowercases, keeps only [a-z0-9] runs), so our ROUGE-L can differ slightly from their
published numbers. InfiniteBench computed its ROUGE-Lsum with `rouge-score` (through `evaluate`), so
`rouge_lsum` is its metric exactly.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

# ---------------------------------------------------------------- RULER


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER: the fraction of references found in the prediction, as substrings, case-insensitive
    (both sides `.lower()`ed; no other normalisation, no tokenisation). Used for NIAH, VT, CWE."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER: 1.0 if any reference is a substring of the prediction (case-insensitive), else 0.0. Used
    for RULER's QA tasks."""
    if not references:
        raise ValueError("string_match_part needs at least one reference")
    pred = prediction.lower()
    return float(max(r.lower() in pred for r in references))


# ---------------------------------------------------------------- needle


def needle_exact_match(prediction: str, value: str) -> float:
    """kvbench's NIAH score: 1.0 if `value` appears in the prediction as a whole token, else 0.0.

    "Whole token": not preceded or followed by a letter or digit, so "12345678" does not match the
    value "1234567", while "is 1234567." does. Case-insensitive (values are digits by default; a word
    value matches RULER's lowercasing). Stricter than RULER's substring match on exactly one point: a
    value inside a longer number or word gets no credit.
    """
    if not value:
        raise ValueError("needle_exact_match needs a non-empty value")
    pattern = r"(?<![0-9A-Za-z])" + re.escape(value.lower()) + r"(?![0-9A-Za-z])"
    return float(re.search(pattern, prediction.lower()) is not None)


# ---------------------------------------------------------------- LongBench (and InfiniteBench QA)


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD / LongBench / InfiniteBench normalisation, in this order: lowercase; delete every ASCII
    punctuation character (`string.punctuation`); replace the whole words a, an, the by a space;
    collapse whitespace to single spaces and strip."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """Token-multiset F1 (LongBench `f1_score`); 0.0 when nothing is shared (also when either is empty)."""
    common = Counter(prediction_tokens) & Counter(reference_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    """LongBench `qa_f1_score` (= InfiniteBench's per reference): token F1 of `normalize_answer` of
    both, split on whitespace."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def rouge_l(prediction: str, reference: str, measure: str = "fmeasure") -> float:
    """ROUGE-L (sentence-level LCS) from `rouge-score`, no stemming; `measure` is "fmeasure" (LongBench
    reports the F) or "recall" (LooGLE's `get_rouge_score` reports the recall) or "precision".

    `rouge-score` lowercases and tokenises on [a-z0-9]+ runs, so the score is case-insensitive and
    ignores punctuation; an empty side gives 0.0.
    """
    return _rouge("rougeL", prediction, reference, measure)


def rouge_lsum(prediction: str, reference: str) -> float:
    """InfiniteBench En.Sum: ROUGE-Lsum F from `rouge-score` (no stemming), as `evaluate.load("rouge")`
    computes it: summary-level LCS over sentences split at newlines."""
    return _rouge("rougeLsum", prediction, reference, "fmeasure")


_SCORERS: dict[str, object] = {}


def _rouge(kind: str, prediction: str, reference: str, measure: str) -> float:
    if measure not in ("fmeasure", "recall", "precision"):
        raise ValueError(f"measure must be fmeasure, recall or precision, got {measure!r}")
    if kind not in _SCORERS:
        from rouge_score import rouge_scorer

        _SCORERS[kind] = rouge_scorer.RougeScorer([kind], use_stemmer=False)
    # rouge-score's argument order is (target, prediction)
    return float(getattr(_SCORERS[kind].score(reference, prediction)[kind], measure))


def classification_score(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """LongBench `classification_score` (TREC, LSHT), case-sensitive substring matching.

    The classes found in the prediction are collected; those that are a substring of the reference
    without being it are then dropped, by a loop that (like LongBench's, which removes from the list it
    iterates over) skips the element right after each one it drops. The score is 1/len(found) if the
    reference is among the found classes, else 0.0. LongBench's fallback to the closest class by
    `difflib` never runs (its guard `list != 0` is always true), so no match scores 0.0 here too.
    """
    if not all_classes:
        raise ValueError("classification_score needs the subset's all_classes")
    found = [c for c in all_classes if c in prediction]
    i = 0
    while i < len(found):
        term = found[i]
        if term in reference and term != reference:
            found.remove(term)
        i += 1  # advances past the element that slid into place: LongBench's skip
    return 1.0 / len(found) if reference in found else 0.0


def retrieval_score(prediction: str, reference: str) -> float:
    """LongBench PassageRetrieval-en: the paragraph id is the number in the reference's "Paragraph N";
    the score is the share of the prediction's digit runs equal to it (0.0 with no digits)."""
    m = re.findall(r"Paragraph (\d+)", reference)
    if not m:
        raise ValueError(f"retrieval_score: no 'Paragraph N' in the reference {reference!r}")
    return _share_equal(prediction, m[0])


def count_score(prediction: str, reference: str) -> float:
    """LongBench PassageCount: the share of the prediction's digit runs equal to the reference count."""
    return _share_equal(prediction, str(reference))


def _share_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def code_sim_score(prediction: str, reference: str) -> float:
    """LongBench LCC / RepoBench-P: the first line of the prediction (after leading newlines) that holds
    no backtick, "#" or "//", compared to the reference by fuzzywuzzy's `fuzz.ratio` / 100.

    `fuzz.ratio` is reproduced as fuzzywuzzy computes it without python-Levenshtein: 1.0 for equal
    strings, 0.0 if either is empty, else round(100 * difflib ratio) / 100. (With python-Levenshtein
    installed fuzzywuzzy uses another ratio and LongBench's numbers can differ by a point.)
    """
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    if line == reference:
        return 1.0
    if not line or not reference:
        return 0.0
    return int(round(100 * difflib.SequenceMatcher(None, line, reference).ratio())) / 100


# ---------------------------------------------------------------- InfiniteBench


def first_int(prediction: str) -> str:
    """InfiniteBench `first_int_match`: the first run of ASCII digits in the prediction, or ""."""
    m = re.search(r"[0-9]+", prediction)
    return m.group(0) if m else ""


def first_int_score(prediction: str, label: str) -> float:
    """InfiniteBench Retrieve.PassKey and Retrieve.Number: 1.0 if the first digit run equals the label."""
    return float(first_int(prediction) == label)


_INFBENCH_SPLIT = ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}")


def _words(prediction: str, chars: Sequence[str] = _INFBENCH_SPLIT) -> list[str]:
    for c in chars:
        prediction = prediction.replace(c, " ")
    return prediction.split()


def kv_retrieval_score(prediction: str, label: str) -> float:
    """InfiniteBench Retrieve.KV: 1.0 if the label is one of the prediction's words after the characters
    newline : " ' . , ? ! { } are replaced by spaces. Case-sensitive."""
    return float(label in _words(prediction))


def dialogue_score(prediction: str, label: str) -> float:
    """InfiniteBench En.Dia: 1.0 if the label (a character's name, upper case) is one of the prediction's
    words after splitting as `kv_retrieval_score` does and upper-casing the words (not the label)."""
    return float(label in [w.upper() for w in _words(prediction)])


def choice_score(prediction: str, labels: Sequence[str]) -> float:
    """InfiniteBench En.MC (`get_score_one_longbook_choice_eng`); `labels` = [option text, letter].

    In order: if the prediction's first character is one of A-D, it must be a label; else after
    replacing newline " ' . , ? ! { } by spaces and collapsing double spaces, the text after the first
    of the prefixes "answer is:", "answer:", "answer is", "option is" (case-sensitive, in that order of
    preference) must start with a label; else the first word that is a substring of "ABCD" must be a
    label. An empty prediction scores 0.0 (InfiniteBench would raise).
    """
    if not prediction:
        return 0.0
    if prediction[0] in "ABCD":
        return float(prediction[0] in labels)
    for c in ("\n", '"', "'", ".", ",", "?", "!", "{", "}"):
        prediction = prediction.replace(c, " ")
    while "  " in prediction:
        prediction = prediction.replace("  ", " ")
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        at = prediction.find(prefix)
        if at == -1:
            continue
        if len(prediction) < at + len(prefix) + 1:
            return 0.0
        after = prediction[at + len(prefix) + 1:]
        return float(any(after.startswith(label) for label in labels))
    for word in prediction.split():
        if word in "ABCD":
            return float(word in labels)
    return 0.0


# ---------------------------------------------------------------- LooGLE cloze


def _as_dict(x) -> dict | None:
    if isinstance(x, Mapping):
        return dict(x)
    if not isinstance(x, str):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            out = parse(x)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(out, dict):
            return out
    return None


def cloze_exact_match(prediction, reference) -> float:
    """LooGLE shortdep_cloze `get_exact_match`: the prediction is read as a dict {"<mask-i>": entity}
    (a Python or JSON literal; anything else scores 0.0) and the score is the share of the reference's
    masks whose predicted entity is equal, case-sensitive. LooGLE sums matches over the whole set before
    dividing (a micro average); averaging these per-sample shares is a macro average."""
    ref, hyp = _as_dict(reference), _as_dict(prediction)
    if not ref:
        raise ValueError(f"cloze reference must be a non-empty mask -> entity dict, got {reference!r}")
    if hyp is None:
        return 0.0
    return sum(k in hyp and hyp[k] == v for k, v in ref.items()) / len(ref)


def cloze_partial_match(prediction, reference) -> float:
    """LooGLE shortdep_cloze `get_partial_match`: the share of the reference's masks whose predicted
    entity shares at least one whitespace-split word with the reference entity, case-sensitive."""
    ref, hyp = _as_dict(reference), _as_dict(prediction)
    if not ref:
        raise ValueError(f"cloze reference must be a non-empty mask -> entity dict, got {reference!r}")
    if hyp is None:
        return 0.0
    hits = sum(k in hyp and bool(set(str(v).split()) & set(str(hyp[k]).split())) for k, v in ref.items())
    return hits / len(ref)


# ---------------------------------------------------------------- one entry point per metric name


def _best(per_reference: Callable[[str, str], float]) -> Callable[..., float]:
    # LongBench and InfiniteBench QA: the best score over the reference answers
    def score(prediction: str, answers: Sequence, **_) -> float:
        if not answers:
            raise ValueError("at least one reference answer is needed")
        return max(per_reference(prediction, a) for a in answers)

    return score


def _first(per_label: Callable[[str, str], float]) -> Callable[..., float]:
    # InfiniteBench's retrieval scorers take label[0] when the label is a list
    def score(prediction: str, answers: Sequence, **_) -> float:
        if not answers:
            raise ValueError("a label is needed")
        return per_label(prediction, answers[0])

    return score


METRICS: dict[str, Callable[..., float]] = {
    "string_match_all": lambda p, answers, **_: string_match_all(p, answers),
    "string_match_part": lambda p, answers, **_: string_match_part(p, answers),
    "needle_exact_match": lambda p, answers, **_: _best(needle_exact_match)(p, answers),
    "qa_f1": _best(qa_f1),
    "rouge_l": _best(rouge_l),
    "rouge_l_recall": _best(lambda p, a: rouge_l(p, a, measure="recall")),
    "rouge_lsum": _best(rouge_lsum),
    "classification": lambda p, answers, all_classes=(), **_: _best(
        lambda q, a: classification_score(q, a, all_classes))(p, answers),
    "retrieval": _best(retrieval_score),
    "count": _best(count_score),
    "code_sim": _best(code_sim_score),
    "first_int": _first(first_int_score),
    "kv_retrieval": _first(kv_retrieval_score),
    "dialogue": _first(dialogue_score),
    "choice": lambda p, answers, **_: choice_score(p, answers),
    "cloze_exact_match": _first(cloze_exact_match),
    "cloze_partial_match": _first(cloze_partial_match),
}

# LongBench cuts these subsets' predictions to their first line before scoring (eval.py)
LONGBENCH_FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def score(metric: str, prediction: str, answers: Sequence, *, all_classes: Sequence[str] = (),
          subset: str | None = None) -> float:
    """Score one prediction against a sample's answers with a metric named in METRICS.

    Multi-reference metrics take the max over `answers` (LongBench, InfiniteBench QA); RULER's take the
    list whole; InfiniteBench's label metrics take `answers` as its label list. `subset` applies
    LongBench's first-line cut for trec, triviaqa, samsum and lsht.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    if subset in LONGBENCH_FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return float(METRICS[metric](prediction, list(answers), all_classes=list(all_classes)))
