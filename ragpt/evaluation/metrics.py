"""Metrics for offline evaluation: answers, retrieval, latency, and their uncertainty.

Answer metrics use the official SQuAD v1.1 normalisation (lower-case, strip punctuation,
articles and extra whitespace) so that numbers compare with published ones. Every metric is
defined per question; a run reports the mean with a seeded percentile-bootstrap 95% interval,
because on a few hundred test questions a 2-point difference is often noise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ragpt.data.qa import normalize_answer


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def token_f1(prediction: str, truth: str) -> float:
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(gold)
    return 2 * precision * recall / (precision + recall)


def best_over(metric: Callable[[str, str], float], prediction: str, truths: Sequence[str]) -> float:
    """SQuAD scores a prediction against each gold answer and keeps the best."""
    return max((metric(prediction, t) for t in truths), default=0.0)


def answer_in_text(answers: Sequence[str], text: str) -> bool:
    """Does any gold answer occur (normalised) in the text? Used for retrieval hit rate."""
    norm = normalize_answer(text)
    return any(normalize_answer(a) and normalize_answer(a) in norm for a in answers)


# ---------------------------------------------------------------------------- long answers


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row of memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, truth: str) -> float:
    """ROUGE-L F-measure (beta = 1, as the `rouge-score` package computes it) on SQuAD-normalised
    tokens: LCS / len(prediction) is precision, LCS / len(truth) is recall.

    Unlike token-F1 it rewards word order, which matters for the long grounding spans of doc2dial.
    """
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    lcs = lcs_length(pred, gold)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


def groundedness(prediction: str, context: str) -> float | None:
    """Share of the answer's (normalised) tokens that occur anywhere in the context it was given.

    None for an empty answer: a share of nothing is undefined, and counting it as 0 or 1 would
    reward or punish silence. A low value flags answers made up rather than read off the context.
    """
    tokens = normalize_answer(prediction).split()
    if not tokens:
        return None
    vocab = set(normalize_answer(context).split())
    return sum(t in vocab for t in tokens) / len(tokens)


# ---------------------------------------------------------------------------- retrieval


def first_relevant_rank(relevant: Sequence[bool]) -> int | None:
    """1-based rank of the first relevant item of a ranked list, None when there is none."""
    return next((i for i, r in enumerate(relevant, start=1) if r), None)


def reciprocal_rank(rank: int | None) -> float:
    return 0.0 if rank is None else 1.0 / rank


def recall_at_k(ranks: Sequence[int | None], k: int) -> float:
    """Share of questions whose first relevant item is in the top k (with one gold document per
    question, recall@k and hit rate@k are the same number)."""
    if not ranks:
        return float("nan")
    return sum(r is not None and r <= k for r in ranks) / len(ranks)


# ---------------------------------------------------------------------------- summaries


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100, linear interpolation as numpy does); None for no values."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap confidence interval over n per-question values."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def scaled(self, factor: float) -> Interval:
        """The same interval in other units (e.g. x100 for percent)."""
        def f(v: float | None) -> float | None:
            return None if v is None else v * factor

        return Interval(f(self.mean), f(self.low), f(self.high), self.n)

    def to_dict(self, digits: int = 2) -> dict:
        d = asdict(self)
        return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in d.items()}


def bootstrap_ci(
    values: Sequence[float], *, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> Interval:
    """Mean and percentile-bootstrap interval: resample the questions with replacement.

    Deterministic for a seed. The same seed over the same n draws the same resamples, so
    intervals of two methods scored on the same questions are paired. The interval is widened
    to include the mean if float rounding of the resample means would leave it a hair outside.
    """
    x = np.asarray([v for v in values if v is not None], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(None, None, None, 0)
    mean = float(x.mean())
    if n_resamples < 1:
        return Interval(mean, None, None, n)  # no resampling asked for: no interval, rather than a fake one
    if n == 1:
        return Interval(mean, mean, mean, n)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    step = max(1, 2_000_000 // n)  # bound memory: at most ~2M indices at a time
    for start in range(0, n_resamples, step):
        stop = min(n_resamples, start + step)
        means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Interval(mean, min(float(low), mean), max(float(high), mean), n)


def paired_difference_ci(
    a: Sequence[float | None], b: Sequence[float | None], **kw
) -> Interval:
    """Bootstrap interval of mean(a - b) over the questions both scored: is a really better than b?"""
    if len(a) != len(b):
        raise ValueError("paired values must have the same length")
    diffs = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    return bootstrap_ci(diffs, **kw)
