import math
import time

import numpy as np
import pytest

from kvbench.metrics import (
    average_lagging,
    corpus_scores,
    lagging_mean,
    lagging_scores,
    length_adaptive_average_lagging,
    paired_bootstrap,
    perplexity,
    reference_words,
)

AL, LAAL = average_lagging, length_adaptive_average_lagging


# ------------------------------------------------------------------ AL / LAAL
def test_wait_k_ideal():
    # (a) src = ref = hyp = 4 words, wait-2: delays [2, 3, 4, 4].
    # gamma = 4/4 = 1; tau = 3 (delays[2] = 4 >= |src|).
    # AL = ((2-0) + (3-1) + (4-2)) / 3 = 6/3 = 2  (= k, as expected for wait-k).
    # LAAL: gamma = max(4, 4)/4 = 1 -> identical, 2.
    assert AL([2, 3, 4, 4], 4, ref_len=4) == pytest.approx(2.0)
    assert LAAL([2, 3, 4, 4], 4, ref_len=4) == pytest.approx(2.0)
    assert AL([2, 3, 4, 4], 4) == pytest.approx(2.0)  # hyp fallback, same length


def test_hyp_shorter_than_ref():
    # (b) src=4, ref=6, hyp=3, delays [2, 3, 4]; tau = 3.
    # AL: gamma = 6/4, 1/gamma = 2/3: 2 + (3 - 2/3) + (4 - 4/3) = 7 -> 7/3.
    # LAAL: max(3, 6) = 6 -> same 7/3.
    assert AL([2, 3, 4], 4, ref_len=6) == pytest.approx(7 / 3)
    assert LAAL([2, 3, 4], 4, ref_len=6) == pytest.approx(7 / 3)
    # Without a reference AL uses |hyp| = 3: 1/gamma = 4/3:
    # 2 + (3 - 4/3) + (4 - 8/3) = 5 -> 5/3.
    assert AL([2, 3, 4], 4) == pytest.approx(5 / 3)
    assert AL([2, 3, 4], 4, hyp_len=3) == pytest.approx(5 / 3)


def test_hyp_longer_than_ref():
    # (c) src=4, ref=4, hyp=8, delays [1,1,2,2,3,3,4,4]; tau = 7 (first 4).
    # sum d_1..7 = 16, sum (i-1) for i=1..7 = 21.
    # AL:   gamma = 4/4 = 1     -> (16 - 21) / 7   = -5/7  (over-generation rewarded)
    # LAAL: gamma = max(8,4)/4 = 2 -> (16 - 21/2) / 7 = 11/14
    d = [1, 1, 2, 2, 3, 3, 4, 4]
    assert AL(d, 4, ref_len=4) == pytest.approx(-5 / 7)
    assert LAAL(d, 4, ref_len=4) == pytest.approx(11 / 14)
    assert LAAL(d, 4, ref_len=4) > AL(d, 4, ref_len=4)


def test_finishes_before_full_source():
    # (d) src=6, ref=3, delays [2, 3, 4]: no delay reaches 6 -> tau = len = 3.
    # gamma = 3/6, 1/gamma = 2: 2 + (3-2) + (4-4) = 3 -> 3/3 = 1.
    assert AL([2, 3, 4], 6, ref_len=3) == pytest.approx(1.0)
    assert LAAL([2, 3, 4], 6, ref_len=3) == pytest.approx(1.0)


def test_tau_stops_sum():
    # words after tau must not count: appending more full-source words is a no-op
    assert AL([2, 3, 4, 4, 4, 4], 4, ref_len=4) == pytest.approx(AL([2, 3, 4], 4, ref_len=4))


# ------------------------------------------------------------------ edges, as SimulEval 1.1.4
def test_first_delay_beyond_source_is_the_score():
    # SimulEval: `if delays[0] > source_length: return delays[0]`, whatever gamma is.
    assert AL([7, 8, 9], 5, ref_len=3) == 7.0
    assert LAAL([7, 8, 9], 5, ref_len=3) == 7.0
    assert AL([6], 5) == 6.0
    # equal to |src| is not "beyond": the ordinary formula, tau = 1 -> d_1 = 5
    assert AL([5, 5], 5, ref_len=2) == pytest.approx(5.0)


def test_later_delay_beyond_source_ends_the_sum():
    # delays [1, 6, 7], |src| = 5, |ref| = 3: tau = 2 (6 >= 5), 1/gamma = 5/3:
    # (1 - 0) + (6 - 5/3) = 16/3 -> / 2 = 8/3. LAAL: max(3, 3) -> the same.
    assert AL([1, 6, 7], 5, ref_len=3) == pytest.approx(8 / 3)
    assert LAAL([1, 6, 7], 5, ref_len=3) == pytest.approx(8 / 3)


def test_empty_hypothesis_is_skipped():
    # SimulEval skips a sample without delays; here AL/LAAL are NaN and the row says so.
    assert math.isnan(AL([], 5, ref_len=3)) and math.isnan(AL([], 5))
    assert math.isnan(LAAL([], 5, ref_len=3))
    row = lagging_scores([], 5, "a b c")
    assert row["lagging_skipped"] is True and math.isnan(row["al"]) and math.isnan(row["laal"])
    assert row["ref_words"] == 3
    ok = lagging_scores([2, 3, 4, 4], 4, "a b c d")
    assert ok == {"al": pytest.approx(2.0), "laal": pytest.approx(2.0), "ref_words": 4, "lagging_skipped": False}


def test_cell_mean_leaves_skipped_samples_out():
    # SimulEval's corpus AL is the mean over the samples it did not skip.
    assert lagging_mean([1.0, math.nan, 3.0, None]) == (2.0, 2)
    assert lagging_mean([2.0, 4.0]) == (3.0, 0)
    mean, skipped = lagging_mean([math.nan, math.nan])
    assert math.isnan(mean) and skipped == 2


def test_reference_words_split_on_single_spaces():
    # SimulEval's reference_length is len(reference.split(" ")): doubled spaces add empty words,
    # tabs and newlines do not separate words.
    assert reference_words("a b c") == 3
    assert reference_words("a  b") == 3
    assert reference_words(" a b ") == 4
    assert reference_words("a\tb c\nd") == 2
    assert reference_words(None) is None and reference_words("") is None  # no reference: |hyp|
    # and it is the |ref| the row's AL uses: delays [2, 3, 4], |src| = 4, "a  b c" -> |ref| = 4:
    # gamma = 1: (2 + 2 + 2) / 3 = 2; split() would give |ref| = 3 and 1/gamma = 4/3: 5/3.
    row = lagging_scores([2, 3, 4], 4, "a  b c")
    assert row["ref_words"] == 4 and row["al"] == pytest.approx(2.0)
    assert AL([2, 3, 4], 4, ref_len=3) == pytest.approx(5 / 3)
    # no reference: |hyp| (SimulEval with reference None)
    assert lagging_scores([2, 3, 4], 4, "")["al"] == pytest.approx(AL([2, 3, 4], 4))


@pytest.mark.parametrize(
    "call",
    [
        lambda: AL([1, 2], 0, ref_len=2),  # src_len < 1
        lambda: AL([2, 1], 3, ref_len=2),  # decreasing
        lambda: AL([-1, 1], 3, ref_len=2),  # negative
        lambda: AL([1, float("nan")], 3, ref_len=2),
        lambda: AL([1, float("inf")], 3, ref_len=2),
        lambda: AL([1, 2], 3, ref_len=0),
        lambda: AL([1, 2], 3, ref_len=2, hyp_len=5),  # inconsistent hyp_len
        lambda: LAAL([3, 2], 3, ref_len=2),
        lambda: LAAL([1, 2], 2.5, ref_len=2),  # non-integer src_len
    ],
)
def test_invalid_inputs(call):
    # deliberate differences from SimulEval: inputs no agent can produce are errors, not scores
    with pytest.raises(ValueError):
        call()


# ------------------------------------------------------------------ BLEU / chrF
def _corpus(n=100, seed=1):
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(50)]
    refs = [" ".join(rng.choice(vocab, size=rng.integers(8, 16))) for _ in range(n)]
    # degraded system: every second word replaced by an out-of-vocabulary token
    bad = [" ".join(w if j % 2 else "zz" for j, w in enumerate(r.split())) for r in refs]
    return refs, bad


def test_corpus_scores_identical():
    refs, _ = _corpus(10)
    s = corpus_scores(refs, refs)
    assert s["bleu"] == pytest.approx(100.0)
    assert s["chrf"] == pytest.approx(100.0)
    assert "tok:13a" in s["bleu_signature"] and "nrefs:1" in s["bleu_signature"]
    assert s["chrf_signature"].startswith("nrefs:1")


def test_corpus_scores_degraded_and_length_check():
    refs, bad = _corpus(10)
    assert corpus_scores(bad, refs)["bleu"] < 50
    with pytest.raises(ValueError):
        corpus_scores(bad[:-1], refs)


# ------------------------------------------------------------------ bootstrap
def test_bootstrap_identical_systems():
    refs, bad = _corpus(30)
    r = paired_bootstrap(bad, bad, refs, n_resamples=200)
    assert r["delta"] == 0.0
    assert r["p_value"] == 1.0  # b never strictly beats an identical a
    assert r["ci_low"] <= r["bleu_b"] <= r["ci_high"]


def test_bootstrap_better_system_fast_and_deterministic():
    refs, bad = _corpus(100)
    t0 = time.perf_counter()
    r = paired_bootstrap(bad, refs, refs, n_resamples=1000, seed=0)
    elapsed = time.perf_counter() - t0
    assert r["delta"] > 40
    assert r["bleu_b"] == pytest.approx(100.0)
    assert r["p_value"] < 0.01
    assert r["ci_low"] <= r["ci_high"]
    assert elapsed < 4.0  # spec: < 2 s; slack for loaded CI machines
    # reversed: a worse system has p ~ 1
    assert paired_bootstrap(refs, bad, refs, n_resamples=100)["p_value"] > 0.99
    # determinism
    mixed = [b if i % 3 else r_ for i, (b, r_) in enumerate(zip(bad, refs))]
    x = paired_bootstrap(bad, mixed, refs, n_resamples=300, seed=7)
    y = paired_bootstrap(bad, mixed, refs, n_resamples=300, seed=7)
    z = paired_bootstrap(bad, mixed, refs, n_resamples=300, seed=8)
    assert x == y
    assert (x["ci_low"], x["ci_high"]) != (z["ci_low"], z["ci_high"])


def test_bootstrap_matches_corpus_scores():
    refs, bad = _corpus(20)
    r = paired_bootstrap(bad, refs, refs, n_resamples=10)
    assert r["bleu_a"] == pytest.approx(corpus_scores(bad, refs)["bleu"])


# ------------------------------------------------------------------ perplexity
def test_perplexity():
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
