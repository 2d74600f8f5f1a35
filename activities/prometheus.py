"""Prometheus over its HTTP API (instant queries)."""

from __future__ import annotations

import math

import httpx
from temporalio.exceptions import ApplicationError


def query(url: str, promql: str, *, timeout: float = 10.0) -> float:
    """The value of an instant query that returns one number (a scalar or a one-sample vector). NaN when the
    vector is empty: no data is not zero."""
    try:
        resp = httpx.get(f"{url.rstrip('/')}/api/v1/query", params={"query": promql}, timeout=timeout)
    except httpx.HTTPError as e:
        raise ApplicationError(f"prometheus {url}: {type(e).__name__}: {e}", type="PrometheusUnavailable") from None
    if resp.status_code == 400:
        raise ApplicationError(f"prometheus: bad query {promql!r}: {resp.json().get('error', resp.text[:200])}", type="BadInput", non_retryable=True)
    if resp.status_code != 200:
        raise ApplicationError(f"prometheus {url}: HTTP {resp.status_code}", type="PrometheusUnavailable")
    data = resp.json()["data"]
    if data["resultType"] == "scalar":
        return float(data["result"][1])
    if data["resultType"] == "vector":
        if not data["result"]:
            return math.nan
        if len(data["result"]) > 1:
            raise ApplicationError(f"prometheus: {promql!r} returned {len(data['result'])} series; aggregate it to one (e.g. sum(...))",
                                   type="BadInput", non_retryable=True)
        return float(data["result"][0]["value"][1])
    raise ApplicationError(f"prometheus: {promql!r} returned a {data['resultType']}, not a number", type="BadInput", non_retryable=True)
