"""The canary judge on known samples: Mann-Whitney with Hodges-Lehmann, as Kayenta's classifier."""

import numpy as np
import pytest
from scipy import stats

from opsflow.judge import classify, hodges_lehmann, judge

rng = np.random.default_rng(7)
BASE = list(rng.normal(0.100, 0.010, 60))


def test_identical_samples_pass():
    r = classify("latency", BASE, list(BASE))
    assert r.classification == "pass" and not r.failed
    assert "identical" in r.reason


def test_same_distribution_passes():
    other = list(np.random.default_rng(8).normal(0.100, 0.010, 60))
    r = classify("latency", other, BASE, direction="increase")
    assert r.classification == "pass", r.reason
    assert r.lower <= 0 <= r.upper or abs(r.ratio - 1) < 0.25


def test_clear_increase_fails_when_increase_is_bad():
    slow = [v + 0.300 for v in BASE[:40]]
    r = classify("latency", slow, BASE, direction="increase")
    assert r.classification == "high" and r.failed
    assert r.estimate == pytest.approx(0.300, abs=0.01)
    assert r.lower > 0.25 * r.estimate and r.ratio > 1.25
    assert r.p_value < 0.001


def test_improvement_passes_with_direction_increase():
    fast = [v * 0.5 for v in BASE]
    r = classify("latency", fast, BASE, direction="increase")
    assert r.classification == "pass" and not r.failed
    assert r.reason.startswith("lower, but a decrease is not bad")
    # the same figures with direction either fail as "low"
    assert classify("latency", fast, BASE, direction="either").classification == "low"
    assert classify("latency", fast, BASE, direction="decrease").failed


def test_small_significant_shift_within_tolerance_passes():
    # 5 % slower and statistically clear on many samples: Kayenta's effect-size threshold lets it pass.
    base = list(np.random.default_rng(1).normal(1.0, 0.01, 400))
    canary = list(np.random.default_rng(2).normal(1.05, 0.01, 400))
    r = classify("latency", canary, base, direction="increase")
    assert r.p_value < 1e-6 and r.lower > 0
    assert r.classification == "pass"


def test_too_few_samples_is_inconclusive_never_a_pass():
    r = classify("errors", [0.5, 0.6], BASE, min_samples=5)
    assert r.classification == "inconclusive" and not r.failed
    assert "too few samples" in r.reason
    assert classify("errors", [], BASE).classification == "inconclusive"
    verdict = judge([r])
    assert verdict.verdict == "inconclusive"


def test_nan_samples_are_dropped():
    # an error-rate query divides by zero when nothing was served: NaN is no data
    r = classify("errors", [float("nan")] * 10, BASE)
    assert r.classification == "inconclusive" and r.canary_n == 0


def test_ties_error_rates_mostly_zero():
    baseline = [0.0] * 30
    canary = [0.0] * 5 + [0.12, 0.15, 0.1, 0.2, 0.14, 0.11, 0.13, 0.16, 0.1, 0.12] * 2
    r = classify("error-rate", canary, baseline, direction="increase")
    assert r.classification == "high" and r.ratio == float("inf")
    # Errors in only a third of the samples: the median shift is 0, so the rank test passes it (as Kayenta
    # would); the metric's absolute `max` threshold is what catches sparse errors.
    sparse = [0.0] * 20 + [0.12, 0.15, 0.1, 0.2, 0.14, 0.11, 0.13, 0.16, 0.1, 0.12]
    assert classify("error-rate", sparse, baseline, direction="increase").classification == "pass"
    # all values equal on both sides: a tie everywhere is a pass
    assert classify("error-rate", [0.0] * 10, [0.0] * 30).classification == "pass"
    # a healthy canary with as many zeros passes
    r2 = classify("error-rate", [0.0] * 29 + [0.01], [0.0] * 28 + [0.01, 0.0], direction="increase")
    assert r2.classification == "pass"


def test_hodges_lehmann_matches_definition_and_p_value_matches_scipy():
    c = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 8.0])
    b = np.array([0.0, 1.0, 1.0, 2.0, 2.0])
    est, lo, hi = hodges_lehmann(c, b, 0.9)
    assert est == pytest.approx(np.median([x - y for x in c for y in b]))
    assert lo <= est <= hi
    r = classify("m", list(c), list(b), min_samples=3)
    assert r.p_value == pytest.approx(stats.mannwhitneyu(c, b, use_continuity=True, method="asymptotic").pvalue)


def test_score_and_critical():
    ok = classify("latency", BASE, list(BASE))
    bad = classify("errors", [v + 1 for v in BASE], BASE, direction="increase")
    bad_critical = classify("errors", [v + 1 for v in BASE], BASE, direction="increase", critical=True)
    assert judge([ok, ok]).verdict == "pass"
    assert judge([ok, bad_critical]).verdict == "fail" and judge([ok, bad_critical]).score == 0
    # 3 of 4 passed: 75 -> marginal, not an automatic rollback
    mixed = judge([ok, ok, ok, bad], pass_score=95, marginal_score=75)
    assert mixed.verdict == "marginal" and mixed.score == 75
    assert judge([ok, bad]).verdict == "fail"
    assert judge([]).verdict == "inconclusive"
