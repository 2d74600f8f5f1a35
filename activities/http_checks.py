"""Smoke tests over HTTP: each URL of the region must answer 2xx/3xx."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from temporalio.exceptions import ApplicationError

from opsflow.contracts.traffic import HTTP_SMOKE
from opsflow.models import RegionTarget, SmokeResult


def probe(url: str, timeout: float = 10) -> SmokeResult:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status = resp.status
        return SmokeResult(url=url, status=status, ok=200 <= status < 400, seconds=time.monotonic() - started)
    except urllib.error.HTTPError as e:
        return SmokeResult(url=url, status=e.code, ok=False, error=str(e.reason), seconds=time.monotonic() - started)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return SmokeResult(url=url, status=None, ok=False, error=str(reason), seconds=time.monotonic() - started)


@HTTP_SMOKE.implementation
def smoke(target: RegionTarget) -> list[SmokeResult]:
    """Retryable on failure: a service that has just been scaled may need a moment."""
    results = [probe(url) for url in target.smoke_urls]
    failed = [r for r in results if not r.ok]
    if failed:
        detail = "; ".join(f"{r.url}: {r.status or r.error}" for r in failed)
        raise ApplicationError(f"smoke test failed in {target.region}: {detail}", type="SmokeFailed")
    return results
