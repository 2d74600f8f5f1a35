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


# -- limit_min_requests: a limit judges only on enough canary traffic ---------------------------------------------

COUNTED = SPEC.model_copy(update={"requests": "sum(increase(req[{interval}]))", "limit_min_requests": 20})
BURST = MetricSamples(name="error-rate", canary=[0.0, 0.125, 0.125], baseline=[0.0] * 3)  # 1 error in 8 requests


def counted(recent: float | None, whole: float | None = None, seconds: int = 3) -> Samples:
    return Samples(metrics=[BURST], start=T, end=f"2024-01-01T00:00:{seconds:02d}Z", canary_recent_requests=recent,
                   canary_requests=whole if whole is not None else recent)


def test_a_limit_does_not_judge_below_limit_min_requests():
    from opsflow.rollout import limit_shortfall

    why = limit_shortfall(COUNTED, counted(8))
    assert why == "not enough traffic yet: 8 canary request(s) in the last 5s, limits judge from 20"
    assert limit_shortfall(COUNTED, counted(20)) is None  # at the minimum: the limit judges
    assert limit_shortfall(COUNTED, counted(0)) is not None  # no request series at all: 0, not "unknown"
    # the recent span is one interval (the limits' samples); the whole window (the judge's) is named as such
    assert "in the last 40s" in limit_shortfall(COUNTED, counted(100, 8, seconds=40), recent_span=False)
    # not counted: no `requests` query (or a result from before the count): the limits judge as they always did
    assert limit_shortfall(SPEC, counted(8)) is None
    assert limit_shortfall(COUNTED, counted(None)) is None


def test_the_judge_leaves_a_low_traffic_limit_to_a_person_and_fails_it_with_traffic():
    from activities.analysis import judge_step
    from opsflow.rollout import JudgeRequest

    few = judge_step(JudgeRequest(analysis=COUNTED, samples=counted(8), weight=25))
    assert few.verdict == "inconclusive" and not few.failed_metrics()  # neither pass nor an automatic rollback
    assert "limits not judged (not enough traffic yet: 8 canary request(s)" in few.reason
    assert "only 8 canary requests" in few.reason  # below min_requests (100) too
    # between limit_min_requests and min_requests the limit judges (and the judge says low traffic)
    some = judge_step(JudgeRequest(analysis=COUNTED, samples=counted(50), weight=25))
    assert some.verdict == "fail" and [m.name for m in some.failed_metrics()] == ["error-rate"]
    # a limit_min_requests above min_requests: the rank test's pass is no pass while the limits could not judge
    high = COUNTED.model_copy(update={"min_requests": 10, "limit_min_requests": 500,
                                      "metrics": [SPEC.metrics[0].model_copy(update={"max": 0.5})]})
    calm = MetricSamples(name="error-rate", canary=[0.0] * 10, baseline=[0.0] * 10)
    got = Samples(metrics=[calm], start=T, end=T, canary_requests=200, canary_recent_requests=200)
    step = judge_step(JudgeRequest(analysis=high, samples=got, weight=25))
    assert step.verdict == "inconclusive" and step.reason.startswith("limits not judged")


def test_limit_min_requests_keeps_old_inventories_digests():
    # a late field (opsflow/sections.py LateFields): left out of the serialised form while at its default
    assert "limit_min_requests" not in SPEC.model_dump() and SPEC.limit_min_requests == 20
    assert COUNTED.model_copy(update={"limit_min_requests": 30}).model_dump()["limit_min_requests"] == 30
