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


# -- missing data (Kayenta's nanStrategy) and the per-metric effect size ---------------------------------------

def test_missing_series_is_inconclusive_by_default_zero_or_skipped_when_the_metric_says_so():
    # no 5xx series yet: the canary's error-rate query returns nothing, the baseline's zeros
    never_failed = [0.0] * 30
    assert classify("error-rate", [], never_failed).classification == "inconclusive"
    zero = classify("error-rate", [], never_failed, missing="zero")
    # with no points at all even `zero` has nothing to compare (the Prometheus activity fills the step grid)
    assert zero.classification == "inconclusive" and "no data for the canary" in zero.reason
    nan_points = [float("nan")] * 30  # 0/0 when nothing was served in a step
    assert classify("error-rate", nan_points, never_failed).classification == "inconclusive"
    z = classify("error-rate", nan_points, never_failed, missing="zero")
    assert z.classification == "pass" and z.canary_n == 30 and z.canary_mean == 0
    # zero does not hide real errors: NaN steps are 0, the failing steps still count
    errors = [float("nan")] * 5 + [0.2] * 25
    assert classify("error-rate", errors, never_failed, missing="zero", direction="increase").classification == "high"
    s = classify("error-rate", [], never_failed, missing="skip")
    assert s.classification == "skipped" and not s.failed and "missing: skip" in s.reason
    # skip is only for a side with no data at all: too few samples stay inconclusive
    assert classify("error-rate", [0.1, 0.2], never_failed, missing="skip").classification == "inconclusive"


def test_a_skipped_metric_is_left_out_of_the_score():
    ok = classify("latency", BASE, list(BASE))
    skipped = classify("queue-depth", [], BASE, missing="skip")
    inconclusive = classify("queue-depth", [], BASE)
    v = judge([ok, skipped])
    assert v.verdict == "pass" and v.score == 100 and "1 skipped for want of data: queue-depth" in v.reason
    assert [m.name for m in v.metrics] == ["latency", "queue-depth"]  # still reported
    assert judge([ok, inconclusive]).verdict == "inconclusive"  # the default: a person decides
    only = judge([skipped])
    assert only.verdict == "inconclusive" and "skipped for want of data: queue-depth" in only.reason


def test_effect_size_is_per_metric():
    base = list(np.random.default_rng(1).normal(1.0, 0.01, 400))
    canary = list(np.random.default_rng(2).normal(1.05, 0.01, 400))  # 5 % higher, statistically clear
    assert classify("latency", canary, base, direction="increase").classification == "pass"  # tolerance 25 %
    strict = classify("latency", canary, base, direction="increase", effect=0.02)
    assert strict.classification == "high" and strict.failed
    # a looser metric lets a 30 % shift pass that the global tolerance fails
    slower = [v * 1.3 for v in base[:100]]
    assert classify("latency", slower, base, direction="increase").classification == "high"
    assert classify("latency", slower, base, direction="increase", effect=0.5).classification == "pass"


def test_judge_activity_applies_each_metrics_policy():
    from datetime import datetime, timezone

    from activities.analysis import judge_step
    from opsflow.rollout import AnalysisSpec, JudgeRequest, MetricSamples, Samples

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    spec = AnalysisSpec(prometheus="http://prometheus", min_requests=0, metrics=[
        {"name": "error-rate", "query": "e", "missing": "zero", "critical": True, "effect": 0.1},
        {"name": "saturation", "query": "s", "missing": "skip"},
        {"name": "latency", "query": "l"},
    ])
    samples = Samples(start=now, end=now, metrics=[
        MetricSamples(name="error-rate", canary=[float("nan")] * 20, baseline=[0.0] * 20),
        MetricSamples(name="saturation", canary=[], baseline=[]),
        MetricSamples(name="latency", canary=BASE[:30], baseline=BASE[30:]),
    ])
    step = judge_step(JudgeRequest(analysis=spec, samples=samples, weight=25))
    by = {m.name: m.verdict for m in step.metrics}
    assert step.verdict == "pass", step.reason
    assert by == {"error-rate": "pass", "saturation": "skipped", "latency": "pass"}
    # the same figures under the default policy wait for a person
    default = spec.model_copy(
        update={"metrics": [m.model_copy(update={"missing": "inconclusive"}) for m in spec.metrics]})
    assert judge_step(JudgeRequest(analysis=default, samples=samples, weight=25)).verdict == "inconclusive"


def test_policy_rejects_an_unknown_missing_strategy():
    from pydantic import ValidationError

    from opsflow.rollout import MetricSpec

    with pytest.raises(ValidationError, match="missing"):
        MetricSpec(name="m", query="q", missing="replace")
    with pytest.raises(ValidationError, match="effect"):
        MetricSpec(name="m", query="q", effect=-1)
