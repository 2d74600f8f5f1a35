"""What every AWS call shares: a boto3 client per call, AWS errors as Temporal errors, polling and heartbeats.

Synchronous boto3 (run the providers in sync activities on the worker's thread pool). A client is built per
call from the inventory's `AwsConnection` (`endpoint_url` override, e.g. the lab's moto server, and region);
credentials come from boto3's usual chain (environment, profile, instance/task role), never from the
inventory. botocore retries a few times itself (standard mode, 3 attempts); what is left is mapped onto
Temporal errors by `aws_errors()`:

* access denied / not found / invalid parameter (and missing credentials) -> `ApplicationError(...,
  non_retryable=True)` whose message names the resource (type AwsAccessDenied, AwsNotFound,
  AwsInvalidParameter, AwsCredentials);
* throttling, HTTP 5xx, connection failures and anything else -> retryable (AwsThrottled, AwsUnavailable,
  AwsError); the activity's retry policy bounds them.

Waits heartbeat when they run inside an activity (`activity.in_activity()`), and work outside one too.
This module imports nothing of opsflow's SQL side, so the secret stores (activities/secrets.py) use its
`new_session` too.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError, PartialCredentialsError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.context import sleep_or_cancelled as _sleep
from opsflow.inventory import AwsConnection

_THROTTLED = {
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled", "RequestThrottledException",
    "RequestLimitExceeded", "TooManyRequestsException", "SlowDown", "PriorRequestNotComplete", "BandwidthLimitExceeded",
}
_ACCESS = {
    "AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnauthorizedAccess", "AuthorizationError",
    "InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch", "AuthFailure", "OptInRequired",
}
_INVALID = {
    "InvalidInput", "InvalidArgument", "InvalidRequest", "ValidationError", "ValidationException", "MissingParameter",
    "MalformedQueryString", "InvalidChangeBatch", "InvalidDomainName", "InvalidAction",
}


# -- clients and errors -------------------------------------------------------------------------------


def client(conn: AwsConnection | None, service: str, region: str | None = None) -> Any:
    conn = conn or AwsConnection()
    config = Config(
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=30,
        user_agent_extra="opsflow",
        s3={"addressing_style": "path"} if conn.endpoint_url else None,
    )
    return new_session().client(
        service, region_name=region or conn.default_region, endpoint_url=conn.endpoint_url, config=config
    )


_PARSED: dict = {}  # botocore's data files (service models, endpoint rules), parsed once per process


def new_session() -> boto3.session.Session:
    """A new Session per call (boto3's sessions are not thread-safe, and activities run on a pool), so credentials
    come from boto3's chain as they are now. Its loader shares the parsed data files: parsing them again took ~0.2 s of
    CPU per client (a describe loop in a wait made a new client each time). The loader caches the files it parsed in
    `_cache` (botocore.loaders.instance_cache); its results depend only on the search paths, the same for all."""
    core = botocore.session.get_session()
    core.get_component("data_loader")._cache = _PARSED
    return boto3.session.Session(botocore_session=core)


def aws_error(e: Exception, what: str) -> ApplicationError:
    """An AWS SDK error as a Temporal ApplicationError whose message names `what` (the resource)."""
    if isinstance(e, ApplicationError):
        return e
    if isinstance(e, ClientError):
        err = e.response.get("Error", {}) or {}
        code = str(err.get("Code", "") or "")
        message = str(err.get("Message", "") or "").strip()
        http = int((e.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
        text = f"{what}: {code or http}: {message or e}"
        details = {"code": code, "http_status": http, "resource": what}
        if code in _THROTTLED or "Throttl" in code:
            return ApplicationError(text, details, type="AwsThrottled")
        if http >= 500 or code in (
            "InternalFailure",
            "InternalError",
            "ServiceUnavailable",
            "ServiceUnavailableException",
        ):
            return ApplicationError(text, details, type="AwsUnavailable")
        if code in _ACCESS or "AccessDenied" in code or http == 403:
            return ApplicationError(text, details, type="AwsAccessDenied", non_retryable=True)
        if "NotFound" in code or code.startswith("NoSuch") or http == 404:
            return ApplicationError(text, details, type="AwsNotFound", non_retryable=True)
        if code.startswith("InvalidParameter") or code in _INVALID:
            return ApplicationError(text, details, type="AwsInvalidParameter", non_retryable=True)
        return ApplicationError(text, details, type="AwsError")
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return ApplicationError(
            f"{what}: no AWS credentials on this worker ({e})", type="AwsCredentials", non_retryable=True
        )
    if isinstance(e, NoRegionError):
        return ApplicationError(f"{what}: no AWS region given", type="AwsInvalidParameter", non_retryable=True)
    if isinstance(e, BotoCoreError):  # connection refused/reset, timeouts, unparsable answers
        return ApplicationError(f"{what}: {e}", type="AwsUnavailable")
    return ApplicationError(f"{what}: {type(e).__name__}: {e}", type="AwsError")


@contextmanager
def aws_errors(what: str) -> Iterator[None]:
    try:
        yield
    except ApplicationError:
        raise
    except (ClientError, BotoCoreError) as e:
        raise aws_error(e, what) from None


def error_code(e: ApplicationError) -> str:
    d = e.details[0] if e.details else None
    return d.get("code", "") if isinstance(d, dict) else ""


def heartbeat_details() -> list[Any]:
    """What the previous attempt of this activity heartbeated last (empty outside an activity)."""
    if not activity.in_activity():
        return []
    try:
        return list(activity.info().heartbeat_details or [])
    except Exception:  # noqa: BLE001 - payloads that do not decode: start afresh
        return []


class Poll:
    """Poll intervals that start short (the lab answers in a second) and back off to `cap` (RDS takes minutes)."""

    def __init__(self, first: float = 0.25, cap: float = 5.0):
        self.delay, self.cap = first, cap

    def sleep(self) -> None:
        _sleep(self.delay)
        self.delay = min(self.cap, self.delay * 1.5)


def utc(t: datetime) -> datetime:
    """An AWS timestamp (or a point asked for) in UTC; a naive one is taken as UTC."""
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
