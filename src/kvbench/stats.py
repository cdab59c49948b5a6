"""Confidence intervals and significance tests for the result tables.

Translation scores use sacreBLEU's own paired tests (`sacrebleu.significance.PairedTest`): paired
bootstrap resampling (Koehn 2004) and approximate randomization (Riezler & Maxwell 2005), both
two-sided against a baseline system, and sacreBLEU's bootstrap 95% CI (mean +- half-width of the
2.5-97.5 percentile range). Perplexity has no sacreBLEU counterpart: its CI is a seeded bootstrap
over documents of exp(sum NLL / sum tokens).

A significance test needs enough paired samples to reject anything at all: with n pairs,
approximate randomization has 2^n sign patterns, two of which (the observed one and its mirror)
reach the observed difference, so its p-value is at least 2^(1-n); below MIN_TEST_SAMPLES = 6 no
difference can be significant at 0.05, and the tables say "n < 6" instead of a p-value.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence

import numpy as np

MIN_TEST_SAMPLES = 6
ALPHA = 0.05


@contextlib.contextmanager
def _sacrebleu_seed(seed: int):
    """PairedTest reads its RNG seed from SACREBLEU_SEED (its documented knob); set it for one call."""
    old = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(int(seed))
    logging.getLogger("sacrebleu").setLevel(logging.WARNING)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SACREBLEU_SEED", None)
        else:
            os.environ["SACREBLEU_SEED"] = old


def _metrics(tokenize: str) -> dict:
    from sacrebleu.metrics import BLEU, CHRF

    return {"BLEU": BLEU(tokenize=tokenize), "chrF": CHRF()}


def _paired(systems: list[tuple[str, Sequence[str]]], refs: Sequence[str], test: str, n: int, seed: int,
            tokenize: str):
    from sacrebleu.significance import PairedTest

    with _sacrebleu_seed(seed or 12345):  # sacreBLEU reads seed 0 as "unseeded": use its default instead
        pt = PairedTest([(name, list(h)) for name, h in systems], _metrics(tokenize), [list(refs)],
                        test_type=test, n_samples=n, n_ar_confidence=-1)
        _, scores = pt()
    names = [k for k in scores if k != "System"]  # sacreBLEU names them by score (e.g. "chrF2")
    return dict(zip(_metrics(tokenize), (scores[k] for k in names)))


def translation_ci(hyps: Sequence[str], refs: Sequence[str], n_resamples: int = 1000, seed: int = 0,
                   tokenize: str = "13a") -> dict:
    """sacreBLEU's bootstrap 95% CI of corpus BLEU and chrF: {bleu_ci_low, bleu_ci_high, chrf_ci_low, ...}."""
    if len(hyps) < 2:
        return {}
    scores = _paired([("cell", hyps), ("cell_again", hyps)], refs, "bs", n_resamples, seed, tokenize)
    out = {}
    for metric, col in (("BLEU", "bleu"), ("chrF", "chrf")):
        base = scores[metric][0]  # the baseline's Result: score, bootstrap mean, CI half-width
        # sacreBLEU reports mean +- half-width; near 0 or 100 that can leave the scale: clip to it
        out[f"{col}_ci_low"] = float(min(max(base.mean - base.ci, 0.0), 100.0))
        out[f"{col}_ci_high"] = float(min(max(base.mean + base.ci, 0.0), 100.0))
    return out


def paired_tests(base: Sequence[str], hyps: Sequence[str], refs: Sequence[str], n_resamples: int = 1000,
                 seed: int = 0, tokenize: str = "13a") -> dict:
    """A system against a baseline on the same segments: BLEU delta, two-sided p-values of sacreBLEU's
    paired bootstrap (`bleu_p_value`) and approximate randomization (`bleu_p_ar`), or `significance`
    "n < 6" when there are too few pairs for any test to reject."""
    from sacrebleu.metrics import BLEU

    n = len(refs)
    bleu = BLEU(tokenize=tokenize)
    delta = float(bleu.corpus_score(list(hyps), [list(refs)]).score - bleu.corpus_score(list(base), [list(refs)]).score)
    out = {"bleu_delta": delta, "n_paired": n}
    if n < MIN_TEST_SAMPLES:
        return out | {"significance": f"n < {MIN_TEST_SAMPLES}"}
    bs = _paired([("base", base), ("system", hyps)], refs, "bs", n_resamples, seed, tokenize)
    ar = _paired([("base", base), ("system", hyps)], refs, "ar", max(n_resamples, 1000), seed, tokenize)
    p_bs, p_ar = float(bs["BLEU"][1].p_value), float(ar["BLEU"][1].p_value)
    verdict = "same" if delta == 0 else ("significant" if max(p_bs, p_ar) < ALPHA else "not significant")
    return out | {"bleu_p_value": p_bs, "bleu_p_ar": p_ar, "n_resamples": n_resamples, "significance": verdict}


def perplexity_ci(nll_sums: Sequence[float], n_tokens: Sequence[int], n_resamples: int = 1000,
                  seed: int = 0) -> dict:
    """95% percentile bootstrap CI over documents of exp(sum NLL / sum tokens)."""
    nll, tok = np.asarray(nll_sums, dtype=float), np.asarray(n_tokens, dtype=float)
    if len(nll) < 2 or n_resamples < 1:
        return {}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nll), size=(n_resamples, len(nll)))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        ppl = np.exp(nll[idx].sum(1) / tok[idx].sum(1))
    lo, hi = np.percentile(ppl, [2.5, 97.5])
    return {"perplexity_ci_low": float(lo), "perplexity_ci_high": float(hi) if math.isfinite(hi) else math.inf}


def mean_ci(values: Sequence[float], n_resamples: int = 1000, seed: int = 0, name: str = "accuracy") -> dict:
    """95% percentile bootstrap CI over samples of the mean of per-sample scores (`{name}_ci_low/high`)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2 or n_resamples < 1:
        return {}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_resamples, len(v)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {f"{name}_ci_low": float(lo), f"{name}_ci_high": float(hi)}
