"""kvbench.longctx: needle and RULER generators, the benchmarks' scorers, the LongBench-family loaders.

No model, no tokenizer: lengths are counted with a whitespace counter. The scorer tests pin each
comparison (depth to the sentence, case handling, normalisation) so that a change to one fails here.
Loaders read small files in each dataset's real layout under tests/data/longctx/ through
`datasets.load_dataset`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvbench.longctx import loaders, ruler, scoring
from kvbench.longctx.haystack import SyntheticFiller, TextFiller, needle_grid, needle_sample

DATA = Path(__file__).parent / "data" / "longctx"


def words(text: str) -> int:
    return len(text.split())


# a whitespace counter: one synthetic filler sentence holds at most this many tokens, so a prompt built
# to a length lands within it (the next sentence did not fit)
MAX_SENTENCE = 16


# ---------------------------------------------------------------- needle in a haystack

# 30 five-word sentences, all distinct and digit-free: 20 of them fill a 121-token prompt exactly
# (100 filler + 8 needle + 13 question tokens)
ALPHABET = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
            "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
            "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "apple", "berry", "cherry", "damson"]
SENTENCES = [f"Sentence {w} stands right here." for w in ALPHABET]
FIXED = TextFiller([" ".join(SENTENCES)])


@pytest.mark.parametrize("depth,k", [(0, 0), (2.5, 0), (10, 2), (25, 5), (50, 10), (90, 18), (100, 20)])  # 2.5: a tie
def test_needle_lands_at_the_exact_sentence_boundary(depth, k):
    s = needle_sample(words, length=121, depth=depth, seed=3, filler=FIXED)
    assert s.n_tokens == 121
    assert s.before == " ".join(SENTENCES[:k])  # one sentence off either way fails here
    assert s.after == " ".join(SENTENCES[k:20])
    assert s.actual_depth == pytest.approx(k / 20)
    assert s.depth == pytest.approx(depth / 100)
    assert s.context == " ".join(p for p in (s.before, s.needle, s.after) if p)


@pytest.mark.parametrize("depth", [0, 10, 20, 33, 50, 67, 80, 95, 100])
def test_needle_depth_on_synthetic_filler_is_the_nearest_boundary(depth):
    s = needle_sample(words, length=2000, depth=depth, seed=1)
    before, after = words(s.before), words(s.after)
    assert s.actual_depth == pytest.approx(before / (before + after))
    # nearest boundary: within half of the longest sentence of the requested share
    assert abs(s.actual_depth - depth / 100) <= MAX_SENTENCE / 2 / (before + after)
    assert s.answer in s.needle and s.key in s.needle and s.key in s.question


@pytest.mark.parametrize("length", [300, 1000, 4000])
@pytest.mark.parametrize("query_first", [False, True])
def test_needle_hits_the_token_length(length, query_first):
    s = needle_sample(words, length=length, depth=40, seed=0, query_first=query_first)
    assert s.n_tokens == words(s.prompt)
    assert 0 <= length - s.n_tokens < MAX_SENTENCE
    assert s.prompt.startswith(s.question) == query_first
    assert s.prompt.endswith(s.question) != query_first
    assert s.prompt.count(s.answer) == 1


def test_needle_is_deterministic_per_seed_and_shares_the_haystack_across_depths():
    a, b = needle_sample(words, length=800, depth=30, seed=7), needle_sample(words, length=800, depth=30, seed=7)
    assert a == b
    other = needle_sample(words, length=800, depth=30, seed=8)
    assert (other.key, other.answer, other.before) != (a.key, a.answer, a.before)
    deeper = needle_sample(words, length=800, depth=70, seed=7)
    assert (deeper.key, deeper.answer) == (a.key, a.answer)
    assert (a.before + " " + a.after).split() == (deeper.before + " " + deeper.after).split()
    grid = needle_grid(words, lengths=[300, 600], depths=[0, 50, 100], n=2, seed=7)
    assert len(grid) == 12 and grid == needle_grid(words, lengths=[300, 600], depths=[0, 50, 100], n=2, seed=7)
    assert [g.actual_depth for g in grid[:6:2]] == [0.0, pytest.approx(0.5, abs=0.05), 1.0]


def test_needle_from_a_text_column_is_seeded_and_never_repeats_text():
    texts = [f"Story {w} begins. The {w} road bends left! Does the {w} road end? It does for {w}." for w in ALPHABET]
    s = needle_sample(words, length=200, depth=50, seed=2, filler=TextFiller(texts))
    assert s == needle_sample(words, length=200, depth=50, seed=2, filler=TextFiller(texts))
    assert 0 <= 200 - s.n_tokens < MAX_SENTENCE
    sentences = re.split(r"(?<=[.!?])\s+", s.before + " " + s.after)
    assert len(sentences) > 20 and len(sentences) == len(set(sentences))  # no text repeated


@pytest.mark.parametrize("depth", [-1, 100.5, float("nan"), "50"])
def test_needle_rejects_a_depth_outside_0_100(depth):
    with pytest.raises(ValueError, match="depth"):
        needle_sample(words, length=500, depth=depth)


def test_needle_rejects_bad_lengths_and_fillers():
    with pytest.raises(ValueError, match="too short to hold the needle and the question"):
        needle_sample(words, length=15, depth=50)
    with pytest.raises(ValueError, match="no room for a filler sentence"):
        needle_sample(words, length=21, depth=50, filler=FIXED)
    with pytest.raises(ValueError, match="length must be a positive"):
        needle_sample(words, length=0, depth=50)
    with pytest.raises(ValueError, match="empty filler"):
        TextFiller([])
    with pytest.raises(ValueError, match="empty filler"):
        TextFiller(["  ", "\n"])
    with pytest.raises(ValueError, match="filler ran out"):
        needle_sample(words, length=1000, depth=50, filler=TextFiller(["Only one short sentence here."]))


def test_synthetic_filler_is_plain_digit_free_english():
    import random

    it = SyntheticFiller().sentences(random.Random(0))
    sample = [next(it) for _ in range(200)]
    assert all(s[0].isupper() and s.endswith(".") and not any(c.isdigit() for c in s) for s in sample)
    assert all("-" not in s for s in sample)  # keys are hyphenated: they cannot occur in the filler
    assert len(set(sample)) > 150


# ---------------------------------------------------------------- RULER

TASK_LENGTHS = [(task, length) for task in ruler.TASKS for length in (1200, 5000)]


@pytest.mark.parametrize("task,length", TASK_LENGTHS)
def test_ruler_is_seeded_and_hits_the_length(task, length):
    a = ruler.generate(task, words, length=length, n=2, seed=0)
    assert a == ruler.generate(task, words, length=length, n=2, seed=0)
    assert a[0].answers != a[1].answers
    assert a[0].answers != ruler.generate(task, words, length=length, n=1, seed=1)[0].answers
    for s in a:
        assert s.task == task and s.target == length and s.metric == "string_match_all"
        assert s.length == words(s.input) + ruler.TOKENS_TO_GENERATE[task]
        # the largest haystack that fits: one more unit (sentence, noise block, listed word) would not
        assert 0 <= length - s.length <= 40
        assert s.input == s.context + s.question + s.answer_prefix


def test_ruler_niah_multikey_layout():
    s = ruler.niah_multikey(words, length=3000, seed=4)
    assert len(s.answers) == 1 and s.context.count("One of the special magic numbers for ") == 4
    assert s.context.startswith("A special magic number is hidden within the following text.")
    assert s.question.startswith("What is the special magic number for ")
    assert s.answer_prefix.endswith("mentioned in the provided text is")
    key = s.question.split(" for ")[1].split(" mentioned")[0]
    assert f"One of the special magic numbers for {key} is: {s.answers[0]}." in s.context
    assert s.context.count(s.answers[0]) == 1
    needles = ruler.niah_multikey(words, length=2000, seed=4, haystack="needles", key_type="uuids",
                                  value_type="uuids")
    lines = needles.context.split("\n")[1:-1]
    assert len(lines) > 20 and all(line.startswith("One of the special magic uuids for ") for line in lines)
    key = needles.question.split(" for ")[1].split(" mentioned")[0]
    assert [line for line in lines if f" {key} " in line] == [f"One of the special magic uuids for {key} is: "
                                                            f"{needles.answers[0]}."]


def test_ruler_niah_multivalue_layout():
    s = ruler.niah_multivalue(words, length=3000, seed=5)
    assert len(s.answers) == 4 and len(set(s.answers)) == 4
    assert s.context.startswith("Some special magic numbers are hidden")
    assert s.question.startswith("What are all the special magic numbers for ")
    key = s.question.split(" for ")[1].split(" mentioned")[0]
    for v in s.answers:
        assert f"One of the special magic numbers for {key} is: {v}." in s.context


def test_ruler_vt_layout():
    s = ruler.vt(words, length=3000, seed=6)
    a = s.answers
    assert len(a) == 5 and all(len(v) == 5 and v.isupper() for v in a)
    task = s.context.split(ruler.VT_INTRO)[-1]  # after the one-shot example
    value = s.question.split("value ")[1].split(" ")[0]
    assert f"VAR {a[0]} = {value}" in task and value.isdigit() and len(value) == 5
    for prev, var in zip(a, a[1:]):
        assert f"VAR {var} = VAR {prev}" in task
    assert "5 variables are assigned the value " + value in s.answer_prefix
    assert s.context.count(ruler.VT_INTRO) == 2  # the example, then the task


def test_ruler_cwe_layout():
    s = ruler.cwe(words, length=5000, seed=7)
    listed = s.context.split(ruler.CWE_INTRO)[-1].split("\n")[0].split()[1::2]
    counts = {w: listed.count(w) for w in set(listed)}
    assert len(s.answers) == 10 and all(counts[w] == 30 for w in s.answers)  # RULER's freq_cw at >= 4096
    assert {c for w, c in counts.items() if w not in s.answers} == {3}
    short = ruler.cwe(words, length=2000, seed=7)
    listed = short.context.split(ruler.CWE_INTRO)[-1].split("\n")[0].split()[1::2]
    assert all(listed.count(w) == 6 for w in short.answers)  # RULER's short-context setting
    assert all(len(w) == 6 for w in listed)  # same-length pseudo-words: none is a substring of another


def test_ruler_scored_as_ruler_scores():
    for task in ruler.TASKS:
        s = ruler.generate(task, words, length=1500, n=1, seed=9)[0]
        perfect = " ".join(s.answers)
        assert scoring.score(s.metric, perfect, s.answers) == 1.0
        assert scoring.score(s.metric, perfect.upper(), s.answers) == 1.0  # RULER lowercases both sides
        assert scoring.score(s.metric, "I do not know", s.answers) == 0.0
    with pytest.raises(ValueError, match="too short"):
        ruler.cwe(words, length=400)
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.generate("qa", words, length=1000, n=1)


# ---------------------------------------------------------------- scorers


def test_ruler_string_match_is_case_insensitive_substring():
    refs = ["amber-falcon", "1234567", "VAR ABCDE"]
    pred = "The values are AMBER-FALCON and 1234567; also var abcde."
    assert scoring.string_match_all(pred, refs) == 1.0  # fails if matching becomes case-sensitive
    assert scoring.string_match_all("amber-falcon only", refs) == pytest.approx(1 / 3)
    assert scoring.string_match_all("x12345678x", ["1234567"]) == 1.0  # substring, as RULER
    assert scoring.string_match_part("AMBER-falcon", refs) == 1.0
    assert scoring.string_match_part("nothing", refs) == 0.0


def test_needle_exact_match_wants_the_whole_value():
    assert scoring.needle_exact_match("The special magic number is 1234567.", "1234567") == 1.0
    assert scoring.needle_exact_match("1234567", "1234567") == 1.0
    assert scoring.needle_exact_match("12345678", "1234567") == 0.0
    assert scoring.needle_exact_match("x1234567", "1234567") == 0.0
    assert scoring.needle_exact_match("It is AMBER-falcon.", "amber-falcon") == 1.0  # case-insensitive
    assert scoring.needle_exact_match("", "1234567") == 0.0
    s = needle_sample(words, length=400, depth=50, seed=0)
    assert scoring.score("needle_exact_match", f"It is {s.answer}.", [s.answer]) == 1.0


def test_normalize_answer_order_is_longbench_squad():
    assert scoring.normalize_answer("The  Cat's-hat, (A) tale!") == "catshat tale"
    assert scoring.normalize_answer("Theatre an answer") == "theatre answer"  # whole words only


@pytest.mark.parametrize("pred,ref,f1", [
    ("The Eiffel Tower!", "eiffel tower", 1.0),
    ("in Paris, France", "Paris", 0.5),
    ("an apple a day", "the apple", 2 / 3),
    ("cats", "cat", 0.0),
    ("", "cat", 0.0),
    ("red red blue", "red blue blue", 2 / 3),
])
def test_qa_f1_known_values(pred, ref, f1):
    assert scoring.qa_f1(pred, ref) == pytest.approx(f1)


def test_qa_f1_takes_the_best_reference():
    assert scoring.score("qa_f1", "in Paris, France", ["London", "Paris, France"]) == pytest.approx(0.8)


def test_rouge_is_rouge_score():
    from rouge_score import rouge_scorer

    pred, ref = "the cat sat on the mat", "the cat is on the mat"
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(ref, pred)["rougeL"]
    assert scoring.rouge_l(pred, ref) == pytest.approx(expected.fmeasure) == pytest.approx(5 / 6)
    assert scoring.rouge_l("the cat", "the cat sat down", measure="recall") == pytest.approx(0.5)
    assert scoring.rouge_l("the cat", "the cat sat down", measure="precision") == pytest.approx(1.0)
    assert scoring.rouge_l("THE CAT!", "the cat") == 1.0
    summary, ref_sum = "A storm came.\nThe mill broke.", "The mill broke.\nA storm came."
    lsum = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False).score(ref_sum, summary)["rougeLsum"]
    assert scoring.rouge_lsum(summary, ref_sum) == pytest.approx(lsum.fmeasure)
    assert scoring.rouge_lsum(summary, ref_sum) > scoring.rouge_l(summary, ref_sum)
    assert scoring.score("rouge_l_recall", "the cat", ["dog", "the cat sat down"]) == pytest.approx(0.5)


def test_longbench_classification_is_case_sensitive_with_its_quirks():
    classes = ["Abbreviation", "Entity", "Description and abstract concept", "Human being", "Location"]
    assert scoring.classification_score("Human being", "Human being", classes) == 1.0
    assert scoring.classification_score("Entity or Human being", "Human being", classes) == 0.5
    assert scoring.classification_score("human being", "Human being", classes) == 0.0
    assert scoring.classification_score("no idea", "Human being", classes) == 0.0  # no difflib fallback
    # LongBench drops "Numeric" (a part of the reference) and then skips "value": 1/2, not 1
    assert scoring.classification_score("Numeric value", "Numeric value", ["Numeric", "value", "Numeric value"]) == 0.5
    # trec predictions are cut to their first line
    assert scoring.score("classification", "Location\nHuman being", ["Human being"], all_classes=classes,
                         subset="trec") == 0.0


def test_longbench_retrieval_count_and_code_sim():
    assert scoring.retrieval_score("Paragraph 2", "Paragraph 2") == 1.0
    assert scoring.retrieval_score("Paragraph 2, maybe paragraph 3", "Paragraph 2") == 0.5
    assert scoring.retrieval_score("none of them", "Paragraph 2") == 0.0
    assert scoring.count_score("There are 12 unique paragraphs.", "12") == 1.0
    assert scoring.count_score("12 or 13", "12") == 0.5
    assert scoring.code_sim_score("```python\nx = foo(1)\n```", "x = foo(1)") == 1.0
    assert scoring.code_sim_score("# comment\nreturn a + b", "return a - b") == 0.92  # round(100 * 22/24) / 100
    assert scoring.code_sim_score("", "x") == 0.0


def test_infinitebench_scorers():
    assert scoring.first_int_score("The pass key is 68341.", "68341") == 1.0
    assert scoring.first_int_score("Key 1 is not 68341", "68341") == 0.0
    assert scoring.kv_retrieval_score('The value is "a1b2-c3".', "a1b2-c3") == 1.0
    assert scoring.kv_retrieval_score("The value is A1B2-C3.", "a1b2-c3") == 0.0  # case-sensitive
    assert scoring.dialogue_score("I think it was john.", "JOHN") == 1.0
    labels = ["Ilse", "B"]
    assert scoring.choice_score("B", labels) == 1.0
    assert scoring.choice_score("C. Tomas", labels) == 0.0
    assert scoring.choice_score("The answer is: Ilse", labels) == 1.0
    assert scoring.choice_score("I would say the option is B.", labels) == 1.0
    assert scoring.choice_score("I pick B", labels) == 1.0
    assert scoring.choice_score("", labels) == 0.0
    assert scoring.score("qa_f1", "some honey", ["honey"]) == pytest.approx(2 / 3)


def test_loogle_cloze_exact_and_partial_match():
    ref = json.dumps({"<mask-0>": "Noor Haddad", "<mask-1>": "2019"})
    assert scoring.cloze_exact_match("{'<mask-0>': 'Noor Haddad', '<mask-1>': '2020'}", ref) == 0.5
    assert scoring.cloze_exact_match('{"<mask-0>": "noor haddad", "<mask-1>": "2019"}', ref) == 0.5
    assert scoring.cloze_partial_match("{'<mask-0>': 'Haddad', '<mask-1>': '2019'}", ref) == 1.0
    assert scoring.cloze_exact_match("Noor Haddad and 2019", ref) == 0.0
    assert scoring.cloze_exact_match("__import__('os')", ref) == 0.0  # parsed, never executed


def test_every_loader_metric_is_a_scoring_metric():
    names = set(loaders.LONGBENCH_METRICS.values()) | set(loaders.INFINITEBENCH_METRICS.values()) \
        | set(loaders.LOOGLE_METRICS.values())
    assert names <= set(scoring.METRICS)
    with pytest.raises(ValueError, match="unknown metric"):
        scoring.score("bleu", "x", ["x"])


# ---------------------------------------------------------------- loaders


@pytest.fixture
def spy(monkeypatch):
    """Records every datasets.load_dataset call, still making it."""
    import datasets

    calls, real = [], datasets.load_dataset

    def load(path, *args, **kw):
        calls.append((path, args, kw))
        return real(path, *args, **kw)

    monkeypatch.setattr(datasets, "load_dataset", load)
    return calls


def test_longbench_loader_reads_the_real_layout(spy):
    got = loaders.load_longbench("hotpotqa", data_files=str(DATA / "longbench" / "hotpotqa.jsonl"))
    assert spy[0][0] == "json" and spy[0][2]["split"] == "test"
    assert [s.id for s in got] == ["lb-hotpot-0001", "lb-hotpot-0002"]
    s = got[1]
    assert (s.benchmark, s.subset, s.metric) == ("longbench", "hotpotqa", "qa_f1")
    assert s.question == "On which river does Linden lie?" and "Calder River" in s.context
    assert s.answers == ("the Calder River", "Calder") and s.meta == {"length": 40, "language": "en"}
    assert s.score("Calder.") == 1.0 and s.score("It lies on the Calder.") == pytest.approx(0.4)
    trec = loaders.load_longbench("trec", data_files=str(DATA / "longbench" / "trec.jsonl"), limit=1)
    assert len(trec) == 1 and trec[0].metric == "classification" and "Human being" in trec[0].all_classes
    assert trec[0].score("Human being\nLocation") == 1.0 and trec[0].score("Location\nHuman being") == 0.0
    pr = loaders.load_longbench("passage_retrieval_en",
                                data_files=str(DATA / "longbench" / "passage_retrieval_en.jsonl"))
    assert pr[0].metric == "retrieval" and pr[0].score("Paragraph 2") == 1.0
    e = loaders.load_longbench("hotpotqa_e", data_files=str(DATA / "longbench" / "hotpotqa.jsonl"))
    assert e[0].subset == "hotpotqa_e" and e[0].metric == "qa_f1"


def test_infinitebench_loader_reads_the_real_layout(spy):
    qa = loaders.load_infinitebench("longbook_qa_eng", data_files=str(DATA / "infinitebench" / "longbook_qa_eng.jsonl"))
    assert spy[0][0] == "json" and spy[0][2]["split"] == "longbook_qa_eng" and "features" in spy[0][2]
    assert (qa[0].metric, qa[0].answers, qa[0].id) == ("qa_f1", ("honey",), "0")
    assert qa[0].question.startswith("What did Tomas sell")
    mc = loaders.load_infinitebench("longbook_choice_eng",
                                    data_files=str(DATA / "infinitebench" / "longbook_choice_eng.jsonl"))[0]
    assert mc.answers == ("Ilse", "B") and mc.options[1] == "Ilse" and mc.metric == "choice"
    assert mc.score("B") == 1.0
    pk = loaders.load_infinitebench("passkey", data_files=str(DATA / "infinitebench" / "passkey.jsonl"))[0]
    assert pk.metric == "first_int" and pk.score("68341") == 1.0 and "68341" in pk.context


def test_loogle_loader_expands_qa_pairs(spy):
    qa = loaders.load_loogle("shortdep_qa", data_files=str(DATA / "loogle" / "shortdep_qa.jsonl"))
    assert spy[0][0] == "json"
    assert [s.id for s in qa] == ["0-0", "0-1"] and qa[0].context == qa[1].context
    assert qa[0].answers == ("Noor Haddad",) and qa[0].metric == "rouge_l_recall"
    assert qa[0].meta["title"] == "Harbor_Museum" and qa[0].meta["evidence"]
    assert qa[1].score("It added a wing for navigation instruments") == 1.0
    cloze = loaders.load_loogle("shortdep_cloze", data_files=str(DATA / "loogle" / "shortdep_cloze.jsonl"))[0]
    assert json.loads(cloze.answers[0]) == {"<mask-0>": "Noor Haddad", "<mask-1>": "2019"}
    assert cloze.score("{'<mask-0>': 'Noor Haddad', '<mask-1>': '2019'}") == 1.0
    summ = loaders.load_loogle("longdep_summarization",
                               data_files=str(DATA / "loogle" / "longdep_summarization.jsonl"))
    assert len(summ) == 1 and summ[0].question == "" and summ[0].answers[0].startswith("A harbor museum")


def test_loaders_make_the_real_hub_call(monkeypatch):
    import datasets

    calls = []

    def fake(path, *args, **kw):
        calls.append((path, kw))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    for load, subset in ((loaders.load_longbench, "qasper"), (loaders.load_infinitebench, "longbook_qa_eng"),
                         (loaders.load_loogle, "longdep_qa")):
        with pytest.raises(ValueError, match="cannot load"):
            load(subset)
    assert calls[0] == ("THUDM/LongBench", {"name": "qasper", "split": "test"})
    assert calls[1][0] == "xinrongzhang2022/InfiniteBench" and calls[1][1]["split"] == "longbook_qa_eng"
    assert calls[2] == ("bigainlco/LooGLE", {"name": "longdep_qa", "split": "test"})


def test_loaders_reject_unsupported_subsets_and_wrong_layouts():
    with pytest.raises(ValueError, match="jieba"):
        loaders.load_longbench("dureader")
    with pytest.raises(ValueError, match="unknown LongBench subset"):
        loaders.load_longbench("nope")
    with pytest.raises(ValueError, match="no metric"):
        loaders.load_infinitebench("math_calc")
    with pytest.raises(ValueError, match="unknown LooGLE task"):
        loaders.load_loogle("longdep_qa_reorder")
    with pytest.raises(ValueError, match="missing column"):
        loaders.load_longbench("hotpotqa", data_files=str(DATA / "loogle" / "shortdep_qa.jsonl"))


def test_package_docstring_names_the_modules():
    import kvbench.longctx as pkg

    for name in ("haystack", "ruler", "scoring", "loaders"):
        assert f"`{name}`" in pkg.__doc__
