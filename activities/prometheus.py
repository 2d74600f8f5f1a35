"""Prometheus over its HTTP API: range queries for canary analysis, instant queries for the maintenance watch.

Synchronous (httpx blocking client) on the worker's thread pool. A query Prometheus rejects (bad PromQL)
is non-retryable; an unreachable server or a 5xx is retried.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from opsflow.contracts.rollout import PROMETHEUS_SAMPLES
from opsflow.rollout import MetricSamples, Samples, SamplesRequest

TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def fill(template: str, *, deployment: str, version: str = "", interval: float | None = None) -> str:
    """The PromQL template with {deployment}, {version} and {interval} filled in (PromQL's own braces stay)."""
    out = template.replace("{deployment}", deployment).replace("{version}", version)
    if interval is not None:
        out = out.replace("{interval}", f"{max(1, int(round(interval)))}s")
    return out


def query_range(
    base: str, query: str, start: datetime, end: datetime, step: float, *, zero: bool = False
) -> list[float]:
    """The values of a query that returns one series (sum over the rest); NaN/absent points are left out, or,
    with `zero` (a metric's `missing: zero`), are 0: every point of the step grid from start to end has a value,
    so a series that does not exist yet (no 5xx so far) reads as zeros rather than as no data."""
    return query_range_filled(base, query, start, end, step, zero=zero)[0]


def query_range_filled(
    base: str, query: str, start: datetime, end: datetime, step: float, *, zero: bool = False
) -> tuple[list[float], int]:
    """query_range, and how many of the leading values are zeros filled in before the series had any point
    (with `zero`; all of them when it has none): an absolute limit leaves those out (threshold_breaches)."""
    params = {
        "query": query,
        "start": f"{start.timestamp():.3f}",
        "end": f"{end.timestamp():.3f}",
        "step": f"{max(step, 0.001):g}s",
    }
    try:
        r = httpx.get(f"{base.rstrip('/')}/api/v1/query_range", params=params, timeout=TIMEOUT)
    except httpx.HTTPError as e:
        raise ApplicationError(f"prometheus {base} does not answer: {e}", type="PrometheusUnavailable") from None
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    if r.status_code in (400, 422):
        raise ApplicationError(
            f"prometheus rejected the query {query!r}: {body.get('error', r.text[:200])}",
            type="BadInput",
            non_retryable=True,
        )
    if r.status_code != 200 or body.get("status") != "success":
        raise ApplicationError(
            f"prometheus {base}: HTTP {r.status_code}: {body.get('error', r.text[:200])}", type="PrometheusError"
        )
    points: dict[float, float] = {}  # several series: summed point by point, as sum() would
    for s in body["data"]["result"]:
        for t, v in s["values"]:
            points[round(float(t), 3)] = points.get(round(float(t), 3), 0.0) + float(v)
    if not zero:
        return [v for _, v in sorted(points.items()) if math.isfinite(v)], 0
    step = max(step, 0.001)
    first, span = round(start.timestamp(), 3), end.timestamp() - start.timestamp()
    grid = [round(first + k * step, 3) for k in range(int(span / step + 1e-9) + 1)] if span >= 0 else []
    out, leading = [], None
    for k, t in enumerate(grid):
        v = points.get(t, 0.0)
        if leading is None and math.isfinite(points.get(t, math.nan)):  # a NaN point (0/0: no traffic) is no data
            leading = k
        out.append(v if math.isfinite(v) else 0.0)
    return out, len(out) if leading is None else leading


def query(url: str, promql: str, *, at: datetime | None = None, timeout: float | httpx.Timeout = TIMEOUT) -> float:
    """The value of an instant query (at `at`, default now) that returns one number: a scalar or a one-sample
    vector. NaN when the vector is empty: no data is not zero."""
    params = {"query": promql, **({"time": f"{at.timestamp():.3f}"} if at else {})}
    try:
        resp = httpx.get(f"{url.rstrip('/')}/api/v1/query", params=params, timeout=timeout)
    except httpx.HTTPError as e:
        raise ApplicationError(
            f"prometheus {url} does not answer: {type(e).__name__}: {e}", type="PrometheusUnavailable"
        ) from None
    if resp.status_code in (400, 422):
        error = (
            resp.json().get("error", resp.text[:200])
            if resp.headers.get("content-type", "").startswith("application/json")
            else resp.text[:200]
        )
        raise ApplicationError(
            f"prometheus rejected the query {promql!r}: {error}", type="BadInput", non_retryable=True
        )
    if resp.status_code != 200:
        raise ApplicationError(f"prometheus {url}: HTTP {resp.status_code}", type="PrometheusUnavailable")
    data = resp.json()["data"]
    if data["resultType"] == "scalar":
        return float(data["result"][1])
    if data["resultType"] == "vector":
        if not data["result"]:
            return math.nan
        if len(data["result"]) > 1:
            raise ApplicationError(
                f"prometheus: {promql!r} returned {len(data['result'])} series; aggregate it to one (e.g. sum(...))",
                type="BadInput",
                non_retryable=True,
            )
        return float(data["result"][0]["value"][1])
    raise ApplicationError(
        f"prometheus: {promql!r} returned a {data['resultType']}, not a number", type="BadInput", non_retryable=True
    )


def number(value: float) -> float | None:
    """None for no data (NaN) or an infinity: a request count the judge can use, or none."""
    return value if math.isfinite(value) else None


def ending_at(start: datetime, end: datetime, step: float) -> datetime:
    """The start of the step grid that ends at `end` (rather than somewhere in the last step): the last sample is
    the freshest Prometheus has, which is what a look soon after the weight moved needs."""
    span = (end - start).total_seconds()
    if span <= 0:
        return start
    return end - timedelta(seconds=math.floor(span / max(step, 0.001) + 1e-9) * max(step, 0.001))


@PROMETHEUS_SAMPLES.implementation
def samples(req: SamplesRequest) -> Samples:
    """Every metric's values for canary and baseline over [start, end] at the analysis step, and the request volume."""
    a = req.analysis
    b_start, b_end = req.baseline_start or req.start, req.baseline_end or req.end
    start, b_grid = ending_at(req.start, req.end, a.step), ending_at(b_start, b_end, a.step)
    out = []
    for m in a.metrics:
        activity.heartbeat(m.name) if activity.in_activity() else None
        canary, canary_filled = query_range_filled(
            a.prometheus,
            fill(m.query, deployment=req.canary, version=req.canary_version, interval=a.interval),
            start,
            req.end,
            a.step,
            zero=m.missing == "zero",
        )
        baseline, baseline_filled = query_range_filled(
            a.prometheus,
            fill(m.query, deployment=req.baseline, version=req.baseline_version, interval=a.interval),
            b_grid,
            b_end,
            a.step,
            zero=m.missing == "zero",
        )
        out.append(
            MetricSamples(
                name=m.name,
                canary=canary,
                baseline=baseline,
                canary_filled=canary_filled,
                baseline_filled=baseline_filled,
            )
        )
    canary_requests = baseline_requests = recent_requests = seen = None
    if a.requests:
        window = (req.end - req.start).total_seconds()

        def canary_count(seconds: float) -> float | None:
            promql = fill(a.requests, deployment=req.canary, version=req.canary_version, interval=seconds)
            return number(query(a.prometheus, promql, at=req.end))

        whole = canary_count(window)
        # the requests behind what an absolute limit judges (the last interval of samples, opsflow.rollout.recent):
        # the last interval's, also early in a bake (before the first weight the canary had no traffic; later, the
        # rate windows of the samples hold the previous weight's traffic too), so that short windows (a [1s]
        # increase() holds one scrape: no value) do not hide the first requests
        recent = whole if window == a.interval else canary_count(a.interval)
        seen = recent is not None  # Prometheus has the canary's series (scraped twice in the span): it counts
        # no series: the canary served no request that Prometheus counted (0, not "unknown")
        canary_requests, recent_requests = whole or 0.0, recent or 0.0
        baseline_requests = number(
            query(
                a.prometheus,
                fill(
                    a.requests,
                    deployment=req.baseline,
                    version=req.baseline_version,
                    interval=(b_end - b_start).total_seconds(),
                ),
                at=b_end,
            )
        )
    return Samples(metrics=out, canary_requests=canary_requests, baseline_requests=baseline_requests,
                   canary_recent_requests=recent_requests, canary_seen=seen, start=req.start, end=req.end)
