"""Canary analysis: the judge (opsflow/judge.py, scipy) on samples fetched from Prometheus.

An activity because scipy is no workflow code; it is pure computation, so it never needs a retry to succeed.
"""

from __future__ import annotations

from opsflow.contracts.rollout import ANALYSIS_JUDGE
from opsflow.judge import classify, judge
from opsflow.rollout import JudgeRequest, MetricVerdict, StepAnalysis, limit_shortfall, threshold_breaches


@ANALYSIS_JUDGE.implementation
def judge_step(req: JudgeRequest) -> StepAnalysis:
    """Mann-Whitney per judged metric, the absolute limits, the request volume: one verdict for the step."""
    a, s = req.analysis, req.samples
    specs = {m.name: m for m in a.metrics}
    results = []
    for ms in s.metrics:
        spec = specs[ms.name]
        if spec.judge:
            results.append(classify(ms.name, ms.canary, ms.baseline, direction=spec.direction, confidence=a.confidence,
                                    tolerance=a.tolerance, min_samples=a.min_samples, critical=spec.critical,
                                    effect=spec.effect, missing=spec.missing))
    verdict = judge(results, pass_score=a.pass_score, marginal_score=a.marginal_score)
    metrics = [
        MetricVerdict(
            name=r.name,
            verdict=r.classification,
            canary=r.canary_mean,
            baseline=r.baseline_mean,
            ratio=r.ratio,
            estimate=r.estimate,
            lower=r.lower,
            upper=r.upper,
            p_value=r.p_value,
            canary_samples=r.canary_n,
            baseline_samples=r.baseline_n,
            critical=r.critical,
            reason=r.reason,
        )
        for r in verdict.metrics
    ]
    # the limits on the whole bake, unless it had too little traffic for them (then low traffic decides below)
    short = limit_shortfall(a, s, recent_span=False)
    breaches = [] if short else threshold_breaches(a, s)
    out = StepAnalysis(
        weight=req.weight,
        kind="judge",
        verdict=verdict.verdict,
        score=verdict.score,
        start=s.start,
        end=s.end,
        canary_requests=s.canary_requests,
        baseline_requests=s.baseline_requests,
        reason=verdict.reason,
    )
    # a limit broken: the metric fails whatever the rank test said
    for b in breaches:
        metrics = [m for m in metrics if m.name != b.name] + [b]
    out.metrics = metrics
    if breaches:
        out.verdict = "fail"
        out.reason = "; ".join(f"{b.name}: {b.reason}" for b in breaches) + (
            f"; {out.reason}" if verdict.verdict != "pass" else ""
        )
    elif s.canary_requests is not None and s.canary_requests < a.min_requests:
        # low traffic is never a pass
        out.verdict = "inconclusive" if verdict.verdict != "fail" else "fail"
        out.reason = f"only {s.canary_requests:.0f} canary requests (at least {a.min_requests}); " + out.reason
    if short and out.verdict == "pass":  # limit_min_requests above min_requests: the limits did not judge
        out.verdict = "inconclusive"
    if short:
        out.reason = f"limits not judged ({short}); " + out.reason
    return out
