"""Metrics against hand-computed values; bootstrap interval properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ragpt.evaluation.metrics import (
    Interval,
    best_over,
    bootstrap_ci,
    exact_match,
    first_relevant_rank,
    groundedness,
    lcs_length,
    normalize_answer,
    paired_difference_ci,
    percentile,
    recall_at_k,
    reciprocal_rank,
    rouge_l,
    token_f1,
)

# ---------------------------------------------------------------------------- SQuAD normalisation


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The Cat", "cat"),  # case and a leading article
        ("a dog and an owl", "dog and owl"),  # all three articles, as whole words only
        ("theatre another", "theatre another"),  # "the"/"an" inside words stay
        ("U.S.A.!", "usa"),  # punctuation removed, not replaced by spaces
        ("$1,496.5", "14965"),
        ("  thirty \n\t working   days ", "thirty working days"),  # whitespace collapsed
        ("", ""),
    ],
)
def test_normalize_answer_follows_squad(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_exact_match_ignores_case_punctuation_articles_and_spacing():
    assert exact_match("The  30 working days.", "30 working days") == 1.0
    assert exact_match("30 days", "30 working days") == 0.0


def test_token_f1_hand_values():
    # pred -> [cat, sat, on, mat], gold -> [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7
    assert token_f1("the cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    # multiset overlap: [x, x, y] vs [x, y, y] share one x and one y: P = R = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("nothing shared", "other words") == 0.0
    # SQuAD's convention for empty token lists: equal -> 1, else 0
    assert token_f1("the", "a") == 1.0
    assert token_f1("", "answer") == 0.0


def test_best_over_keeps_the_best_gold_answer():
    assert best_over(token_f1, "30 days", ["thirty days", "30 days"]) == 1.0
    assert best_over(token_f1, "30 days", []) == 0.0


# ---------------------------------------------------------------------------- ROUGE-L


def test_lcs_length_classic_case():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length([], list("abc")) == 0


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        # Lin (2004): [police, killed, gunman] vs [police, kill, gunman]: LCS 2, P = R = 2/3
        ("police killed the gunman", "police kill the gunman", 2 / 3),
        # reversed order: LCS 1 of 3 tokens each
        ("the gunman kill police", "police killed the gunman", 1 / 3),
        # P = 2/2, R = 2/4 -> F = 2 * 1 * 0.5 / 1.5
        ("w y", "w x y z", 2 / 3),
        ("identical answer", "Identical answer!", 1.0),
        ("", "", 1.0),
        ("", "something", 0.0),
    ],
)
def test_rouge_l_hand_cases(pred, gold, expected):
    assert rouge_l(pred, gold) == pytest.approx(expected)


def test_rouge_l_rewards_order_where_token_f1_does_not():
    assert token_f1("w x y z", "z y x w") == 1.0
    assert rouge_l("w x y z", "z y x w") == pytest.approx(0.25)


# ---------------------------------------------------------------------------- groundedness


def test_groundedness_is_the_share_of_answer_tokens_in_the_context():
    assert groundedness("The cat sat.", "A CAT is here") == pytest.approx(0.5)  # cat yes, sat no
    assert groundedness("cat cat dog", "cat") == pytest.approx(2 / 3)  # every occurrence counts
    assert groundedness("30 days", "You get 30 days per year.") == 1.0
    assert groundedness("", "context") is None  # undefined, not 0 or 1
    assert groundedness("the", "context") is None  # nothing left after normalisation


# ---------------------------------------------------------------------------- retrieval


def test_ranks_recall_and_mrr_hand_values():
    assert first_relevant_rank([False, False, True, True]) == 3
    assert first_relevant_rank([False, False]) is None
    ranks = [1, None, 3, 2]
    assert [recall_at_k(ranks, k) for k in (1, 2, 3, 10)] == [0.25, 0.5, 0.75, 0.75]
    mrr = sum(reciprocal_rank(r) for r in ranks) / len(ranks)
    assert mrr == pytest.approx((1 + 0 + 1 / 3 + 1 / 2) / 4)
    assert math.isnan(recall_at_k([], 1))


def test_percentile_linear_interpolation():
    values = list(range(1, 101))
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile([], 50) is None


# ---------------------------------------------------------------------------- bootstrap


def _bernoulli(n: int, p: float, seed: int) -> list[float]:
    return (np.random.default_rng(seed).random(n) < p).astype(float).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_bootstrap_interval_contains_the_mean(seed):
    rng = np.random.default_rng(100 + seed)
    for values in (rng.random(7).tolist(), rng.exponential(size=40).tolist(), _bernoulli(25, 0.1, seed)):
        ci = bootstrap_ci(values, n_resamples=300, seed=seed)
        assert ci.mean == pytest.approx(float(np.mean(values)))
        assert ci.low <= ci.mean <= ci.high
        assert ci.n == len(values)


def test_bootstrap_is_deterministic_for_a_seed_and_depends_on_it():
    values = _bernoulli(80, 0.4, 0)
    a = bootstrap_ci(values, n_resamples=500, seed=7)
    assert bootstrap_ci(values, n_resamples=500, seed=7) == a
    others = {(bootstrap_ci(values, n_resamples=500, seed=s).low, bootstrap_ci(values, n_resamples=500,
                                                                                seed=s).high) for s in range(8)}
    assert len(others) > 1  # the seed really drives the resampling


def test_bootstrap_interval_narrows_with_n_like_the_standard_error():
    small = bootstrap_ci(_bernoulli(50, 0.3, 1), n_resamples=2000, seed=0)
    large_values = _bernoulli(2000, 0.3, 2)
    large = bootstrap_ci(large_values, n_resamples=2000, seed=0)
    assert (large.high - large.low) < (small.high - small.low) / 3
    # For a mean of n Bernoulli(p) values the 95% interval is about 2 * 1.96 * sqrt(p (1 - p) / n) wide.
    p = float(np.mean(large_values))
    expected = 2 * 1.96 * math.sqrt(p * (1 - p) / len(large_values))
    assert (large.high - large.low) == pytest.approx(expected, rel=0.15)


def test_bootstrap_degenerate_inputs():
    assert bootstrap_ci([]) == Interval(None, None, None, 0)
    assert bootstrap_ci([0.7]) == Interval(0.7, 0.7, 0.7, 1)
    assert bootstrap_ci([0.25, 0.75], n_resamples=0) == Interval(0.5, None, None, 2)  # no fake interval
    same = bootstrap_ci([0.1] * 30)
    assert same.low <= same.mean <= same.high and same.high - same.low < 1e-12
    assert bootstrap_ci([1.0, None, 0.0]).n == 2  # undefined values (None) are left out


def test_paired_difference_uses_only_questions_both_scored():
    a = [0.5, 0.7, None, 0.2]
    b = [0.4, 0.6, 0.9, 0.1]
    ci = paired_difference_ci(a, b, n_resamples=200)
    assert ci.n == 3
    assert ci.mean == pytest.approx(0.1) and ci.low == pytest.approx(0.1) and ci.high == pytest.approx(0.1)
    with pytest.raises(ValueError):
        paired_difference_ci([1.0], [1.0, 2.0])


def test_interval_scaling_and_rounding():
    ci = Interval(0.123456, 0.1, 0.2, 9).scaled(100)
    assert ci.to_dict() == {"mean": 12.35, "low": 10.0, "high": 20.0, "n": 9}
