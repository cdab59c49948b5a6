"""Quality and latency metrics for streaming (simultaneous) translation.

All latency metrics are *word level* and follow SimulEval's text-to-text
definitions: ``delays[i]`` is the number of source words that had been read
when target word ``i`` (0-based position, i.e. the (i+1)-th word) was written.

References
----------
* SimulEval 1.1.4 (Ma et al., 2020), ``simuleval/evaluator/scorers/latency_scorer.py``
  (edge cases: see the comment above ``_validate_delays``).
* Average Lagging (AL): Ma et al. 2019, "STACL: Simultaneous Translation with
  Implicit Anticipation and Controllable Latency using Prefix-to-Prefix
  Framework", ACL 2019.
* Length-Adaptive Average Lagging (LAAL): Papi et al. 2022, "Over-Generation
  Cannot Be Rewarded: Length-Adaptive Average Lagging for Simultaneous Speech
  Translation", AutoSimTrans 2022.
* Paired bootstrap resampling: Koehn 2004, "Statistical Significance Tests for
  Machine Translation Evaluation", EMNLP 2004.
* BLEU / chrF via sacreBLEU (Post 2018).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

__all__ = [
    "average_lagging",
    "length_adaptive_average_lagging",
    "lagging_scores",
    "lagging_mean",
    "reference_words",
    "corpus_scores",
    "paired_bootstrap",
    "perplexity",
]


# --------------------------------------------------------------------------- latency
# Edge cases follow SimulEval 1.1.4 (text-to-text, latency unit "word"):
# - a first delay larger than |src| makes the score that delay (SimulEval returns delays[0]); later
#   delays beyond |src| are summed up to tau like any other (tau stops at the first d >= |src|);
# - an empty hypothesis has no delays: SimulEval skips the sample, so AL/LAAL are NaN here and the
#   sample is counted as skipped (`lagging_skipped`); cell means leave NaN out, as SimulEval does;
# - |ref| is `len(reference.split(" "))` (single spaces, as SimulEval's `reference_length`).
# Deliberate differences: kvbench raises on delays that are negative, non-finite or decreasing and
# on src_len < 1 (SimulEval computes something or divides by zero), and an empty reference "" means
# "no reference" (kvbench stores perplexity documents with target ""): |hyp| is used, as SimulEval
# does for a missing reference.
def _validate_delays(delays: Sequence[float], src_len: int) -> list[float]:
    if isinstance(src_len, bool) or not isinstance(src_len, (int, np.integer)) or src_len < 1:
        raise ValueError(f"src_len must be an integer >= 1, got {src_len!r}")
    out = [float(d) for d in delays]
    for i, d in enumerate(out):
        if not math.isfinite(d) or d < 0:
            raise ValueError(f"delays[{i}]={d} must be a finite number >= 0")
        if i and d < out[i - 1]:
            raise ValueError(f"delays must be non-decreasing: delays[{i}]={d} < delays[{i - 1}]={out[i - 1]}")
    return out


def _check_len(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")


def _lagging(delays: list[float], src_len: int, tgt_len: float) -> float:
    """(1/tau) * sum_{i=1..tau} (d_i - (i-1)/gamma), with gamma = tgt_len/src_len; NaN if no delays;
    d_1 when d_1 > src_len (SimulEval's early return)."""
    if not delays:
        return math.nan
    if delays[0] > src_len:
        return delays[0]
    inv_gamma = src_len / tgt_len
    total, tau = 0.0, 0
    for i, d in enumerate(delays):  # i = (1-based index) - 1
        total += d - i * inv_gamma
        tau = i + 1
        if d >= src_len:  # tau = first target word written after the full source
            break
    return total / tau


def reference_words(reference: str | None) -> int | None:
    """|ref| in words as SimulEval counts it: ``len(reference.split(" "))`` (so "a  b" is 3 words).
    None or "" (kvbench's "no reference") -> None: the lagging metrics then use |hyp|."""
    if reference is None or reference == "":
        return None
    return len(reference.split(" "))


def average_lagging(delays: list[float], src_len: int, ref_len: int | None = None,
                    hyp_len: int | None = None) -> float:
    """Average Lagging (Ma et al. 2019), as computed by SimulEval 1.1.4.

    gamma = |ref| / |src| (|hyp| when ``ref_len`` is None, as in SimulEval);
    tau = 1-based index of the first target word with delay >= src_len, or
    ``len(delays)`` if no such word; AL = mean_{i<=tau} (d_i - (i-1)/gamma).
    If the first delay exceeds src_len, AL is that delay (SimulEval's rule).

    ``hyp_len`` defaults to ``len(delays)``; if given it must equal it.
    Empty hypothesis (``delays == []``): NaN -- SimulEval skips such samples;
    see :func:`lagging_scores` for the row fields that count them.
    Raises ValueError on src_len < 1, ref_len/hyp_len < 1, or delays that are
    decreasing, negative or non-finite.
    """
    d = _validate_delays(delays, src_len)
    _check_len("ref_len", ref_len)
    _check_len("hyp_len", hyp_len)
    if hyp_len is not None and hyp_len != len(d):
        raise ValueError(f"hyp_len={hyp_len} != len(delays)={len(d)}")
    return _lagging(d, src_len, ref_len if ref_len is not None else len(d))


def length_adaptive_average_lagging(delays: list[float], src_len: int,
                                    ref_len: int | None = None) -> float:
    """Length-Adaptive Average Lagging (Papi et al. 2022), as in SimulEval 1.1.4.

    Identical to :func:`average_lagging` except gamma = max(|hyp|, |ref|) / |src|
    (|hyp| = ``len(delays)``; |ref| falls back to |hyp| if ``ref_len`` is None),
    so over-long hypotheses are not rewarded with a lower (even negative) lag.
    Empty hypothesis -> NaN (skipped); same edge rules and validation as AL.
    """
    d = _validate_delays(delays, src_len)
    _check_len("ref_len", ref_len)
    return _lagging(d, src_len, max(len(d), ref_len if ref_len is not None else len(d)))


def lagging_scores(delays: list[float], src_len: int, reference: str | None) -> dict:
    """The lagging fields of one result row.

    Returns {"al", "laal", "ref_words", "lagging_skipped"}: AL and LAAL in words
    (NaN when skipped), |ref| as SimulEval counts it (0 without a reference),
    and whether SimulEval would skip the sample (empty hypothesis: no delays).
    """
    n_ref = reference_words(reference)
    return dict(al=average_lagging(delays, src_len, ref_len=n_ref),
                laal=length_adaptive_average_lagging(delays, src_len, ref_len=n_ref),
                ref_words=n_ref or 0, lagging_skipped=len(delays) == 0)


def lagging_mean(values: Sequence[float]) -> tuple[float, int]:
    """Cell mean of per-sample AL (or LAAL) as SimulEval averages it: skipped samples (NaN or None)
    are left out. Returns (mean, number skipped); the mean is NaN when every sample was skipped."""
    vals = [math.nan if v is None else float(v) for v in values]
    kept = [v for v in vals if not math.isnan(v)]
    return (math.fsum(kept) / len(kept) if kept else math.nan), len(vals) - len(kept)


# --------------------------------------------------------------------------- quality
def _check_parallel(refs: Sequence[str], *hyp_lists: Sequence[str]) -> None:
    if len(refs) == 0:
        raise ValueError("need at least one reference")
    for hyps in hyp_lists:
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} hypotheses vs {len(refs)} references")


def corpus_scores(hypotheses: list[str], references: list[str], tokenize: str = "13a") -> dict:
    """Corpus BLEU and chrF (sacreBLEU, one reference per segment).

    Returns {"bleu", "chrf", "bleu_signature", "chrf_signature"}; scores are on
    the usual 0-100 scale, signatures are sacreBLEU's reproducibility strings.
    """
    _check_parallel(references, hypotheses)
    bleu, chrf = BLEU(tokenize=tokenize), CHRF()
    refs = [list(references)]
    b = bleu.corpus_score(list(hypotheses), refs)
    c = chrf.corpus_score(list(hypotheses), refs)
    return {"bleu": float(b.score), "chrf": float(c.score),
            "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


class _BleuStats:
    """The only place touching sacreBLEU's semi-private sufficient-statistics API
    (``_extract_corpus_statistics`` / ``_compute_score_from_stats``, the same
    calls sacreBLEU's own paired-bootstrap test uses)."""

    def __init__(self, references: Sequence[str], tokenize: str):
        self._bleu = BLEU(tokenize=tokenize)
        self._refs = [list(references)]

    def segment_stats(self, hypotheses: Sequence[str]) -> np.ndarray:
        """(n_segments, 2 + 2*max_order) int array: hyp_len, ref_len, matches, totals."""
        return np.asarray(self._bleu._extract_corpus_statistics(list(hypotheses), self._refs),
                          dtype=np.int64)

    def score(self, summed: np.ndarray) -> float:
        # tolist(): fresh python ints, so in-place smoothing can't mutate our arrays
        return float(self._bleu._compute_score_from_stats(summed.tolist()).score)


def paired_bootstrap(hyps_a: list[str], hyps_b: list[str], refs: list[str],
                     n_resamples: int = 1000, seed: int = 0, tokenize: str = "13a") -> dict:
    """Paired bootstrap resampling (Koehn 2004) of corpus BLEU, system b vs baseline a.

    Segment indices are drawn with replacement (``np.random.default_rng(seed)``);
    the same index sample is used for both systems, and corpus BLEU is recomputed
    from summed per-segment sufficient statistics.

    Returns dict with
      delta    : BLEU(b) - BLEU(a) on the full corpus,
      bleu_a, bleu_b : full-corpus BLEU scores,
      ci_low, ci_high: 2.5/97.5 percentiles of b's resampled BLEU (95% CI),
      p_value  : one-sided Koehn p-value for H1 "b is better than a" = fraction of
                 resamples in which b does NOT beat a (BLEU_b <= BLEU_a). Identical
                 systems give 1.0; p < 0.05 means b wins in > 95% of resamples.
    Deterministic for a fixed seed.
    """
    _check_parallel(refs, hyps_a, hyps_b)
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    scorer = _BleuStats(refs, tokenize)
    sa, sb = scorer.segment_stats(hyps_a), scorer.segment_stats(hyps_b)
    bleu_a, bleu_b = scorer.score(sa.sum(0)), scorer.score(sb.sum(0))

    n = len(refs)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    # weights[r, j] = how often segment j was drawn in resample r
    weights = np.zeros((n_resamples, n), dtype=np.int64)
    np.add.at(weights, (np.arange(n_resamples)[:, None], idx), 1)
    tot_a, tot_b = weights @ sa, weights @ sb
    res_a = np.array([scorer.score(row) for row in tot_a])
    res_b = np.array([scorer.score(row) for row in tot_b])

    return {"delta": bleu_b - bleu_a, "bleu_a": bleu_a, "bleu_b": bleu_b,
            "ci_low": float(np.percentile(res_b, 2.5)),
            "ci_high": float(np.percentile(res_b, 97.5)),
            "p_value": float(np.mean(res_b <= res_a)),
            "n_resamples": int(n_resamples)}


# --------------------------------------------------------------------------- LM
def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(nll_sum / n_tokens) with nll_sum in nats; inf on overflow."""
    if n_tokens <= 0:
        raise ValueError(f"perplexity needs n_tokens > 0, got {n_tokens}")
    try:
        return math.exp(nll_sum / n_tokens)
    except OverflowError:
        return math.inf
