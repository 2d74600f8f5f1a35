"""Absolute limits (threshold_breaches): the whole window (old runs) or, with `latest` (patch
"limit-on-recent-samples"), the last interval's samples without the zeros `missing: zero` filled in."""

from opsflow.rollout import AnalysisSpec, MetricSamples, Samples, recent, threshold_breaches

T = "2024-01-01T00:00:00Z"
SPEC = AnalysisSpec.model_validate({
    "prometheus": "http://prometheus", "interval": 5, "step": 1,
    "metrics": [{"name": "error-rate", "query": "q", "max": 0.05, "critical": True, "missing": "zero"},
                {"name": "success", "query": "s", "min": 0.9, "missing": "zero"}],
})


def samples(*metrics: MetricSamples) -> Samples:
    return Samples(metrics=list(metrics), start=T, end=T)


def test_a_new_5xx_series_breaches_at_the_first_look_only_on_recent_samples():
    # 8 s with no 5xx series (filled zeros), then the faulty canary's 15 %
    err = MetricSamples(name="error-rate", canary=[0.0] * 8 + [0.15, 0.16], baseline=[0.0] * 10,
                        canary_filled=8, baseline_filled=10)
    assert threshold_breaches(SPEC, samples(err)) == []  # the old arithmetic: mean 0.031 over the whole window
    [b] = threshold_breaches(SPEC, samples(err), latest=True)
    assert b.verdict == "breach" and b.critical and b.canary_samples == 2 and abs(b.canary - 0.155) < 1e-9
    assert b.baseline == 0.0 and "above the limit 0.05" in b.reason


def test_recent_keeps_the_last_interval_and_real_zeros():
    values = [0.5] * 10 + [0.0, 0.0, 0.0, 0.0, 0.01]
    assert recent(SPEC, values) == [0.0, 0.0, 0.0, 0.0, 0.01]  # last 5 s at 1 s steps
    # zeros of a series that existed are real and count: a canary that recovered is not held to its past
    ok = MetricSamples(name="error-rate", canary=values, baseline=[0.0] * 15)
    assert threshold_breaches(SPEC, samples(ok), latest=True) == []
    assert [b.name for b in threshold_breaches(SPEC, samples(ok))] == ["error-rate"]  # the old: mean 0.33
    # only the filled zeros are dropped
    assert recent(SPEC, [0.0, 0.0, 0.0, 0.2], filled=2) == [0.0, 0.2]
    assert recent(SPEC, [float("nan"), 0.3, float("inf")]) == [0.3]


def test_a_series_that_never_had_a_point_is_zero_as_missing_zero_says():
    # no series at all: every value filled; its value is 0 -- a pass under a max, a breach under a min
    none = [0.0] * 12
    assert recent(SPEC, none, filled=12) == [0.0] * 5
    got = samples(MetricSamples(name="error-rate", canary=none, baseline=none, canary_filled=12, baseline_filled=12),
                  MetricSamples(name="success", canary=none, baseline=none, canary_filled=12, baseline_filled=12))
    assert [(b.name, b.canary) for b in threshold_breaches(SPEC, got, latest=True)] == [("success", 0.0)]


def test_old_activity_results_without_the_filled_counts_still_parse():
    ms = MetricSamples.model_validate({"name": "error-rate", "canary": [0.1], "baseline": []})
    assert ms.canary_filled == 0 and ms.baseline_filled == 0
