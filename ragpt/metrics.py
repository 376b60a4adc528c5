"""Answer metrics with the official SQuAD v1.1 normalisation (lower-case, strip punctuation,
articles and extra whitespace)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


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


def best_over(metric, prediction: str, truths: Sequence[str]) -> float:
    """SQuAD scores a prediction against each gold answer and keeps the best."""
    return max((metric(prediction, t) for t in truths), default=0.0)


def answer_in_text(answers: Sequence[str], text: str) -> bool:
    """Does any gold answer occur (normalised) in the text? Used for retrieval hit rate."""
    norm = normalize_answer(text)
    return any(normalize_answer(a) and normalize_answer(a) in norm for a in answers)
