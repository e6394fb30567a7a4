"""Statistics for the evaluation stage: every figure with its n and a 95% bootstrap CI, paired tests for base vs tuned.

Bootstrap intervals are percentile intervals over items (questions), drawn from a seeded generator so a rerun
reports the same numbers. Items may be plain values (per-question correctness, scores) or rows such as
(gold, predicted) pairs, so that corpus-level statistics like macro-F1 are resampled as a whole.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np

# 1000 resamples put the Monte-Carlo error of a 95% percentile bound at about a tenth of the CI's own width
# (each bound is the 25th/975th order statistic), and a resample matrix of 1000 × a few thousand questions
# stays in the tens of MB.
DEFAULT_RESAMPLES = 1000


@dataclass(frozen=True)
class Estimate:
    value: float  # the statistic on all n items
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; as a `statistic`, it lets the bootstrap run vectorised."""
    return float(np.mean(values))


def _require_items(n: int, what: str = "values") -> None:
    if n == 0:
        raise ValueError(f"{what} is empty: a statistic and its confidence interval need at least one item")


def _require_same_length(first: Sequence, second: Sequence, names: tuple[str, str]) -> None:
    if len(first) != len(second):
        raise ValueError(f"paired inputs differ in length: {names[0]} has {len(first)} items, {names[1]} has {len(second)}")


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """A (resamples, n) matrix of item indices drawn with replacement; the same for the same seed."""
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    return np.random.default_rng(seed).integers(n, size=(resamples, n))


def _percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")
    tail = 100 * (1 - level) / 2  # 0.95 -> the 2.5th and 97.5th percentiles
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(low), float(high)


def _replicates(values: Sequence, statistic: Callable, indices: np.ndarray) -> np.ndarray:
    """The statistic on each resample (one row of `indices` each)."""
    if statistic is mean:
        array = np.asarray(values, dtype=float)
        if array.ndim != 1:
            raise ValueError(f"the mean needs one number per item, got an array of shape {array.shape}")
        return array[indices].mean(axis=1)
    items = list(values)
    return np.array([statistic([items[i] for i in row]) for row in indices], dtype=float)


def bootstrap_ci(values: Sequence, statistic: Callable = mean, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of `statistic` over items; `statistic` receives a list of resampled items (or rows)."""
    _require_items(len(values))
    indices = _resample_indices(len(values), resamples, seed)
    return _percentile_interval(_replicates(values, statistic, indices), level)


def estimate(values: Sequence, statistic: Callable = mean, **kw) -> Estimate:
    """The statistic on all items, with its bootstrap CI (keywords as in `bootstrap_ci`) and n."""
    low, high = bootstrap_ci(values, statistic, **kw)
    return Estimate(float(statistic(list(values))), low, high, len(values))


def accuracy(correct: Sequence[bool], **kw) -> Estimate:
    """Share of correct items, with its bootstrap CI."""
    return estimate([float(c) for c in correct], **kw)


def _f1(tp: int, fp: int, fn: int) -> float:
    """F1 = 2tp / (2tp + fp + fn); 0 when the label never occurs in gold or prediction (sklearn's zero_division=0)."""
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def macro_f1(gold: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str]) -> float:
    """Unweighted mean of per-label F1 over all `labels`, as sklearn's f1_score(average="macro", zero_division=0).

    A prediction that is None (no answer extracted) or outside `labels` is wrong for its gold label and a false
    positive for no label. A gold label outside `labels` raises: it means `labels` is incomplete.
    """
    _require_same_length(gold, predicted, ("gold", "predicted"))
    _require_items(len(gold), "gold")
    unknown = set(gold) - set(labels)
    if unknown:
        raise ValueError(f"gold labels {sorted(unknown)} are not among labels {list(labels)}")
    hits = Counter(g for g, p in zip(gold, predicted, strict=True) if g == p)
    gold_counts, predicted_counts = Counter(gold), Counter(predicted)
    scores = [_f1(hits[label], predicted_counts[label] - hits[label], gold_counts[label] - hits[label]) for label in labels]
    return sum(scores) / len(scores)


def macro_f1_over_rows(labels: Sequence[str]) -> Callable[[Sequence[tuple[str, str | None]]], float]:
    """macro_f1 as a statistic of (gold, predicted) rows, for the bootstrap."""
    return lambda rows: macro_f1([g for g, _ in rows], [p for _, p in rows], labels)


def macro_f1_estimate(gold: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str], **kw) -> Estimate:
    """macro_f1 with a bootstrap CI over items (keywords as in `bootstrap_ci`)."""
    _require_same_length(gold, predicted, ("gold", "predicted"))
    return estimate(list(zip(gold, predicted, strict=True)), macro_f1_over_rows(labels), **kw)


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _answer_tokens(text: str) -> list[str]:
    """SQuAD normalisation: lowercase, drop punctuation (ASCII's, plus Unicode's such as curly quotes) and articles."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    return _ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: bag-of-tokens overlap after normalisation; 1.0 when both normalise to nothing, 0.0 when one does."""
    predicted, expected = _answer_tokens(prediction), _answer_tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


@cache
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imported on first use: it pulls in nltk (~0.3 s)

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (Porter-stemmed LCS), as rouge_score computes it.

    rouge_score keeps only [a-z0-9] tokens: an empty string, or text with no Latin letters or digits (e.g.
    Chinese), scores 0.0 even against itself.
    """
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def describe_lengths(values: Sequence[int]) -> dict:
    """n, mean, median, 95th percentile and max of lengths (tokens or characters); None values when empty."""
    if len(values) == 0:
        return {"n": 0, "mean": None, "median": None, "p95": None, "max": None}
    array = np.asarray(values)
    return {"n": len(values), "mean": float(array.mean()), "median": float(np.median(array)),
            "p95": float(np.percentile(array, 95)), "max": int(array.max())}


def mcnemar(base_correct: Sequence[bool], tuned_correct: Sequence[bool]) -> dict:
    """Exact McNemar test on paired correctness: a two-sided binomial test of b against c with p = 1/2.

    b counts items only the base model got right, c items only the tuned model got right.
    """
    _require_same_length(base_correct, tuned_correct, ("base_correct", "tuned_correct"))
    _require_items(len(base_correct), "base_correct")
    pairs = list(zip(map(bool, base_correct), map(bool, tuned_correct), strict=True))
    b, c = pairs.count((True, False)), pairs.count((False, True))
    discordant = b + c
    # Exact integers: Binomial(b+c, 1/2) puts C(b+c, k) / 2^(b+c) on k; doubling the smaller tail gives the
    # two-sided p-value. Python's int / int rounds correctly even when 2^(b+c) is far beyond float range.
    term = smaller_tail = 1  # C(b+c, 0)
    for k in range(min(b, c)):
        term = term * (discordant - k) // (k + 1)  # C(m, k+1) = C(m, k) (m-k) / (k+1) with m = b+c: exact
        smaller_tail += term
    p_value = min(1.0, 2 * smaller_tail / 2**discordant)  # b = c = 0 gives 2 * 1 / 1, capped to 1.0
    return {"test": "mcnemar-exact", "b": b, "c": c, "p_value": p_value}


def paired_bootstrap(base_values: Sequence, tuned_values: Sequence, statistic: Callable = mean, *,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """statistic(tuned) - statistic(base), with a CI from resampling the same items for both, and a p-value.

    The p-value is the bootstrap's sign test on the difference: twice the smaller share of resampled differences
    on either side of zero (ties count on both sides), capped at 1. A p-value of 0.0 means that no resample
    crossed zero, i.e. p < 2 / resamples. Items may be rows, e.g. (gold, predicted) pairs for macro-F1.
    """
    _require_same_length(base_values, tuned_values, ("base_values", "tuned_values"))
    _require_items(len(base_values), "base_values")
    indices = _resample_indices(len(base_values), resamples, seed)
    differences = _replicates(tuned_values, statistic, indices) - _replicates(base_values, statistic, indices)
    low, high = _percentile_interval(differences, level)
    p_value = min(1.0, 2 * min(np.mean(differences <= 0), np.mean(differences >= 0)))
    difference = statistic(list(tuned_values)) - statistic(list(base_values))
    return {"test": "paired-bootstrap", "difference": float(difference), "low": low, "high": high,
            "p_value": float(p_value), "n": len(base_values)}


def paired_accuracy_difference(base_correct: Sequence[bool], tuned_correct: Sequence[bool], **kw) -> dict:
    """Tuned minus base accuracy with its paired bootstrap CI (keywords as in `paired_bootstrap`), tested by McNemar."""
    test = mcnemar(base_correct, tuned_correct)  # first, so that input errors name base_correct and tuned_correct
    interval = paired_bootstrap([float(c) for c in base_correct], [float(c) for c in tuned_correct], **kw)
    return {"difference": interval["difference"], "low": interval["low"], "high": interval["high"],
            "n": interval["n"], **test}


def ci_text(entry: dict, signed: bool = False) -> str:
    """'0.620 [0.540, 0.700]' from an Estimate's or a paired difference's dict."""
    value = entry["value"] if "value" in entry else entry["difference"]
    sign = "+" if signed else ""
    return f"{value:{sign}.3f} [{entry['low']:{sign}.3f}, {entry['high']:{sign}.3f}]"
