"""Evaluation statistics: hand-computed values, bootstrap CIs that behave like CIs, and exact paired tests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medcot_lib import metrics

LABELS = ["yes", "no", "maybe"]


def correct(right: int, total: int) -> list[bool]:
    return [True] * right + [False] * (total - right)


def width(interval: tuple[float, float]) -> float:
    return interval[1] - interval[0]


# Point values, computed by hand


def test_accuracy_value_n_and_formatting():
    result = metrics.accuracy([True, True, False, False, True])
    assert result.value == pytest.approx(0.6) and result.n == 5
    assert result.to_dict() == {"value": result.value, "low": result.low, "high": result.high, "n": 5}
    assert str(metrics.Estimate(0.62, 0.54, 0.7, 50)) == "0.620 [0.540, 0.700] (n=50)"


def test_macro_f1_by_hand():
    gold = ["yes", "yes", "yes", "no", "no", "maybe", "maybe"]
    predicted = ["yes", "yes", "no", "no", None, "maybe", "yes"]
    # yes:   tp 2, fp 1 (maybe->yes), fn 1 (yes->no)  F1 = 2*2 / (2*2 + 1 + 1) = 2/3
    # no:    tp 1, fp 1 (yes->no),    fn 1 (no->None) F1 = 2*1 / (2*1 + 1 + 1) = 1/2
    # maybe: tp 1, fp 0,              fn 1 (maybe->yes) F1 = 2*1 / (2*1 + 0 + 1) = 2/3
    # macro = (2/3 + 1/2 + 2/3) / 3 = 11/18
    assert metrics.macro_f1(gold, predicted, LABELS) == pytest.approx(11 / 18)


def test_macro_f1_counts_every_given_label_and_treats_unknown_predictions_as_none():
    # "maybe" never occurs: its F1 is 0 (zero_division=0), so a perfect yes/no run scores (1 + 1 + 0) / 3
    assert metrics.macro_f1(["yes", "no"], ["yes", "no"], LABELS) == pytest.approx(2 / 3)
    gold = ["yes", "no", "maybe"]
    assert metrics.macro_f1(gold, ["yes", "no", "unsure"], LABELS) == metrics.macro_f1(gold, ["yes", "no", None], LABELS)
    with pytest.raises(ValueError, match="not among labels"):
        metrics.macro_f1(["yes", "perhaps"], ["yes", "no"], LABELS)


def test_token_f1_by_hand():
    assert metrics.token_f1("The aspirin.", "aspirin") == 1.0  # article and punctuation ignored
    assert metrics.token_f1("Aspirin; “low-dose”!", "aspirin lowdose") == 1.0  # Unicode quotes are punctuation too
    assert metrics.token_f1("K+ > 5", "k 5") == 1.0  # so are ASCII's symbols, as in SQuAD (Unicode calls + and > math)
    # 4 predicted tokens, 3 reference tokens, 3 shared: P = 3/4, R = 1, F1 = 2 * 3/4 / (3/4 + 1) = 6/7
    assert metrics.token_f1("low dose aspirin daily", "aspirin, low dose") == pytest.approx(6 / 7)
    # bag overlap counts a repeated token once per occurrence in both: overlap 1, P = 1/2, R = 1, F1 = 2/3
    assert metrics.token_f1("yes yes", "yes") == pytest.approx(2 / 3)
    assert metrics.token_f1("heparin", "warfarin") == 0.0
    assert metrics.token_f1("", "the") == 1.0  # both normalise to nothing
    assert metrics.token_f1("", "aspirin") == 0.0 and metrics.token_f1("aspirin", "") == 0.0


def test_rouge_l_by_hand():
    # LCS of "the cat lay on a mat" and "the cat sat on the mat" is "the cat on mat": 4 of 6 tokens each, F = 2/3
    assert metrics.rouge_l("the cat lay on a mat", "the cat sat on the mat") == pytest.approx(2 / 3)
    # LCS "aspirin reduces risk" = 3: P = 3/3, R = 3/5, F = 2 * 1 * 0.6 / 1.6 = 0.75
    assert metrics.rouge_l("aspirin reduces risk", "daily aspirin reduces stroke risk") == pytest.approx(0.75)
    # stemming: patients/patient and treated/treating match, were/is do not: LCS 2 of 3, F = 2/3
    assert metrics.rouge_l("patients were treated", "patient is treating") == pytest.approx(2 / 3)
    assert metrics.rouge_l("Aspirin reduces risk.", "aspirin reduces risk") == 1.0
    assert metrics.rouge_l("", "") == 0.0 and metrics.rouge_l("", "aspirin") == 0.0


def test_describe_lengths():
    # p95 by linear interpolation: position 0.95 * 4 = 3.8, so 4 + 0.8 * (100 - 4) = 80.8
    assert metrics.describe_lengths([3, 1, 4, 2, 100]) == {"n": 5, "mean": 22.0, "median": 3.0, "p95": pytest.approx(80.8),
                                                                "max": 100}
    assert metrics.describe_lengths([]) == {"n": 0, "mean": None, "median": None, "p95": None, "max": None}


# Bootstrap confidence intervals


def test_ci_contains_the_value_and_narrows_as_n_grows():
    small, large = metrics.accuracy(correct(12, 20)), metrics.accuracy(correct(120, 200))
    for result in (small, large):
        assert result.low <= result.value <= result.high
    assert large.high - large.low < (small.high - small.low) / 2  # width shrinks like 1/sqrt(n): sqrt(10) ≈ 3.2


def test_ci_is_degenerate_when_every_answer_is_right():
    assert metrics.bootstrap_ci([1.0] * 30) == (1.0, 1.0)


def test_ci_depends_only_on_the_seed():
    values = np.random.default_rng(0).normal(size=50)  # continuous, so that two seeds' percentiles cannot coincide
    assert metrics.bootstrap_ci(values, seed=7) == metrics.bootstrap_ci(values, seed=7)
    assert metrics.bootstrap_ci(values, seed=7) != metrics.bootstrap_ci(values, seed=8)


def test_bernoulli_ci_width_matches_the_normal_approximation():
    expected = 2 * 1.96 * math.sqrt(0.25 / 400)  # ≈ 0.098
    assert width(metrics.bootstrap_ci(correct(200, 400))) == pytest.approx(expected, abs=0.02)


def test_level_sets_the_coverage():
    values = correct(60, 100)
    assert width(metrics.bootstrap_ci(values, level=0.5)) < width(metrics.bootstrap_ci(values, level=0.95))
    with pytest.raises(ValueError, match="level"):
        metrics.bootstrap_ci(values, level=95)


def test_vectorised_mean_equals_the_loop_over_resamples():
    values = np.random.default_rng(1).normal(size=40)
    looped = metrics.bootstrap_ci(values, lambda sample: float(np.mean(sample)), resamples=200)
    assert metrics.bootstrap_ci(values, resamples=200) == pytest.approx(looped)


def test_any_statistic_and_rows():
    median = metrics.estimate([1, 2, 3, 4, 100], np.median, resamples=200)
    assert median.value == 3 and 1 <= median.low <= 3 <= median.high <= 100
    gold = ["yes", "no", "maybe"] * 10
    predicted = ["yes", "no", "yes"] * 10
    result = metrics.macro_f1_estimate(gold, predicted, LABELS, resamples=200)
    assert result.value == pytest.approx(metrics.macro_f1(gold, predicted, LABELS)) and result.n == 30
    assert result.low <= result.value <= result.high and result.low < result.high


# Paired tests


def test_mcnemar_exact_p_values():
    concordant = ([True] * 7 + [False] * 3, [True] * 7 + [False] * 3)  # agreeing items do not enter the test

    def run(b: int, c: int) -> dict:
        base = concordant[0] + [True] * b + [False] * c
        tuned = concordant[1] + [False] * b + [True] * c
        return metrics.mcnemar(base, tuned)

    assert run(0, 10) == {"test": "mcnemar-exact", "b": 0, "c": 10, "p_value": pytest.approx(2 * 0.5**10)}
    assert run(5, 5)["p_value"] == 1.0
    # 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * 56 / 1024
    assert run(2, 8)["p_value"] == pytest.approx(0.109375)
    assert run(8, 2)["p_value"] == pytest.approx(0.109375)
    assert run(0, 0)["p_value"] == 1.0


def test_mcnemar_with_thousands_of_discordant_items():
    # normal approximation with continuity correction: z = (|2550 - 2450| - 1) / sqrt(5000) ≈ 1.40, p ≈ 0.16
    p_value = metrics.mcnemar([True] * 2450 + [False] * 2550, [False] * 2450 + [True] * 2550)["p_value"]
    assert p_value == pytest.approx(0.16, abs=0.01)


def test_paired_bootstrap_of_identical_runs():
    values = correct(30, 50)
    result = metrics.paired_bootstrap(values, values)
    assert result == {"test": "paired-bootstrap", "difference": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0, "n": 50}


def test_paired_bootstrap_p_value_is_two_sided():
    # 10 items only base gets right, 10 only tuned: resampled differences fall evenly around 0, so p ≈ 2 * 1/2
    base = [True] * 10 + [False] * 10 + [True] * 20
    tuned = [False] * 10 + [True] * 10 + [True] * 20
    result = metrics.paired_bootstrap(base, tuned)
    assert result["difference"] == 0.0 and result["low"] < 0 < result["high"] and result["p_value"] > 0.9


def test_paired_bootstrap_detects_a_clearly_better_tuned_model():
    result = metrics.paired_bootstrap(correct(50, 200), correct(150, 200))
    assert result["difference"] == pytest.approx(0.5)
    assert 0 < result["low"] <= 0.5 <= result["high"] and result["p_value"] < 0.01


def test_paired_bootstrap_ofmacro_f1_over_rows():
    gold = ["yes", "no", "maybe"] * 20
    base = [(g, "yes") for g in gold]  # always "yes"
    tuned = [(g, g if i % 4 else "no") for i, g in enumerate(gold)]  # right on 3 items of 4

    def statistic(rows):
        return metrics.macro_f1([g for g, _ in rows], [p for _, p in rows], LABELS)

    result = metrics.paired_bootstrap(base, tuned, statistic, resamples=300)
    assert result["difference"] == pytest.approx(statistic(tuned) - statistic(base))
    assert 0 < result["low"] <= result["difference"] <= result["high"] and result["p_value"] < 0.01


def test_paired_accuracy_difference_combines_bootstrap_and_mcnemar():
    base, tuned = correct(20, 40), correct(30, 40)  # b = 0, c = 10
    result = metrics.paired_accuracy_difference(base, tuned, seed=3)
    interval = metrics.paired_bootstrap([float(x) for x in base], [float(x) for x in tuned], seed=3)
    assert result == {"difference": pytest.approx(0.25), "low": interval["low"], "high": interval["high"], "n": 40,
                      "test": "mcnemar-exact", "b": 0, "c": 10, "p_value": pytest.approx(2 * 0.5**10)}


# Input errors


@pytest.mark.parametrize("call", [
    lambda: metrics.bootstrap_ci([]),
    lambda: metrics.accuracy([]),
    lambda: metrics.macro_f1([], [], LABELS),
    lambda: metrics.mcnemar([], []),
    lambda: metrics.paired_bootstrap([], []),
], ids=["bootstrap_ci", "accuracy", "macro_f1", "mcnemar", "paired_bootstrap"])
def test_empty_input_is_refused_with_a_clear_message(call):
    with pytest.raises(ValueError, match="is empty"):
        call()


@pytest.mark.parametrize("call", [
    lambda: metrics.mcnemar([True] * 3, [True] * 2),
    lambda: metrics.paired_bootstrap([1.0] * 3, [1.0] * 2),
    lambda: metrics.macro_f1(["yes"] * 3, ["yes"] * 2, LABELS),
], ids=["mcnemar", "paired_bootstrap", "macro_f1"])
def test_mismatched_lengths_name_both(call):
    with pytest.raises(ValueError, match=r"\w+ has 3 items, \w+ has 2"):
        call()
