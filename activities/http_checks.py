"""Smoke tests over HTTP: each URL of the region must answer 2xx/3xx; a rollout's checks during its bakes."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from temporalio import activity
from temporalio.exceptions import ApplicationError

from opsflow.contracts.rollout import HTTP_CHECKS
from opsflow.contracts.traffic import HTTP_SMOKE
from opsflow.models import RegionTarget, SmokeResult
from opsflow.rollout import CheckResult, ChecksRequest, HttpCheck


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


def _fill(url: str, req: ChecksRequest) -> str:
    version = req.image.rsplit("/", 1)[-1]
    version = version.rsplit(":", 1)[-1] if ":" in version else "latest"
    return url.replace("{app}", req.app).replace("{weight}", str(req.weight)).replace("{version}", version)


def run_check(check: HttpCheck, req: ChecksRequest) -> CheckResult:
    """One check, bounded by its timeout. Never raises for an answer: a failed check is a verdict, not an error."""
    url, started = _fill(check.url, req), time.monotonic()
    data, headers = None, {"User-Agent": "opsflow-rollout-check"}
    if check.kind == "webhook":
        payload = {"check": check.name, "app": req.app, "image": req.image, "weight": req.weight, "phase": req.phase}
        data, headers["Content-Type"] = json.dumps(payload).encode(), "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
    status, body, error = None, b"", ""
    try:
        with urllib.request.urlopen(request, timeout=check.timeout) as resp:
            status, body = resp.status, resp.read(65536)
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read(65536)
    except (urllib.error.URLError, OSError) as e:
        error = f"no answer: {getattr(e, 'reason', e)}"
    out = CheckResult(name=check.name, ok=False, critical=check.critical, status=status,
                      seconds=time.monotonic() - started)
    text = body.decode("utf-8", "replace")
    if error:
        out.reason = error
    elif check.kind == "smoke":
        if status != check.status:
            out.reason = f"HTTP {status}, expected {check.status}"
        elif check.body is not None and check.body not in text:
            out.reason = f"the answer does not contain {check.body!r}"
        else:
            out.ok, out.reason = True, f"HTTP {status}"
    else:
        try:
            answer = json.loads(text) if text.strip() else {}
        except ValueError:
            answer = {}
        said_no = isinstance(answer, dict) and answer.get("pass") is False
        if 200 <= status < 300 and not said_no:
            out.ok, out.reason = True, f"HTTP {status}: pass"
        else:
            why = answer.get("reason") if isinstance(answer, dict) else None
            out.reason = f"HTTP {status}: fail" + (f": {why}" if why else "")
    return out


@HTTP_CHECKS.implementation
def checks(req: ChecksRequest) -> list[CheckResult]:
    """A rollout's HTTP checks (smoke URLs, webhooks) at one look of a bake: every check's verdict."""
    out = []
    for c in req.checks:
        if activity.in_activity():
            activity.heartbeat(c.name)
        out.append(run_check(c, req))
    return out
