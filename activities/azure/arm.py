"""Azure Resource Manager plumbing shared by the Azure providers (and the Key Vault secret store): credentials,
the management clients, ARM errors as Temporal errors, waits on long-running operations, SDK model access.

The SDKs are blocking: the providers run in synchronous activities on the worker's thread pool. Where they
wait (a long-running operation, an endpoint's health probes) they heartbeat when running in an activity.

Errors: what retrying cannot fix (authentication, permission, resource not found, bad request, no TLS / a CA we
do not trust) raises a non-retryable ApplicationError naming the resource; throttling (429), unavailability
(5xx), timeouts and lost connections raise retryable ones (after the SDK's own retries).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Iterator

from azure.core.credentials import AccessToken
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from temporalio.exceptions import ApplicationError

from activities.context import check_cancelled
from activities.context import heartbeat as _heartbeat
from opsflow.inventory import AzureConnection

log = logging.getLogger(__name__)


STATIC_TOKEN_ENV = "OPSFLOW_AZURE_STATIC_TOKEN"
DEFAULT_STATIC_TOKEN = "opsflow-lab-token"
_FAILED_STATES = {"disabled", "inaccessible"}
# LRO failure codes for which a retry would fail the same way.
_PERMANENT_OPERATION_CODES = {
    "plannedpromotionnotpossible",
    "replicapromotionnotallowed",
    "invalidparametervalue",
    "switchovernotsupported",
    "configurationisreadonly",
    "badrequest",
    "invalidsourceserver",
    "nobackupavailable",
    "operationnotsupported",
}


# -- credentials and clients --------------------------------------------------------------------------------


class StaticTokenCredential:
    """A TokenCredential that always returns the same token (the lab's ARM emulator only)."""

    def __init__(self, token: str):
        self._token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self._token, int(time.time()) + 3600)

    def close(self) -> None:
        pass


def arm_credential(conn: AzureConnection) -> Any:
    """'default': azure-identity's DefaultAzureCredential (managed identity, workload identity, az login...);
    'static-token': a fixed token from $OPSFLOW_AZURE_STATIC_TOKEN (default 'opsflow-lab-token'), lab only."""
    if conn.credential == "static-token":
        return StaticTokenCredential(os.environ.get(STATIC_TOKEN_ENV) or DEFAULT_STATIC_TOKEN)
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def client_kwargs(conn: AzureConnection, fast: bool = False) -> dict[str, Any]:
    endpoint = conn.arm_endpoint.rstrip("/")
    kwargs: dict[str, Any] = {
        "base_url": endpoint,
        # The token audience is the ARM endpoint (public, sovereign clouds and the lab alike).
        "credential_scopes": [f"{endpoint}/.default"],
        "polling_interval": conn.polling_interval,
        # The SDK retries 408/429/5xx and lost connections itself, honouring Retry-After; keep it bounded
        # so that Temporal's retry policy (and our heartbeats) stay in charge of the long waits.
        "retry_total": 4,
        "retry_backoff_factor": 0.5,
        "retry_backoff_max": 20,
        "connection_timeout": 10,
        "read_timeout": 60,
    }
    if conn.ca_bundle:
        kwargs["connection_verify"] = conn.ca_bundle
    if fast:  # an emergency's best-effort call into a region that may be down: fail fast, the caller reports it
        kwargs.update(retry_total=1, retry_backoff_max=2, connection_timeout=5, read_timeout=15)
    return kwargs


def postgres_client(conn: AzureConnection, subscription_id: str, fast: bool = False) -> Any:
    from azure.mgmt.postgresqlflexibleservers import PostgreSQLManagementClient

    return PostgreSQLManagementClient(arm_credential(conn), subscription_id, **client_kwargs(conn, fast))


def traffic_manager_client(conn: AzureConnection, subscription_id: str) -> Any:
    from azure.mgmt.trafficmanager import TrafficManagerManagementClient

    return TrafficManagerManagementClient(arm_credential(conn), subscription_id, **client_kwargs(conn))


# -- error mapping ------------------------------------------------------------------------------------------


def error_code(e: HttpResponseError) -> tuple[str | None, str]:
    err = getattr(e, "error", None)
    code = getattr(err, "code", None) if err is not None else None
    message = getattr(err, "message", None) if err is not None else None
    return code, (message or e.message or str(e)).strip().splitlines()[0]


def arm_error(e: Exception, what: str) -> ApplicationError:
    """Map an azure-core exception onto an ApplicationError: non-retryable for what a retry cannot fix."""
    if isinstance(e, ApplicationError):
        return e
    if isinstance(e, (ServiceRequestError, ServiceResponseError)):
        text = str(e)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            return ApplicationError(
                f"{what}: the ARM endpoint's TLS certificate is not trusted (set azure.ca_bundle?): {text}",
                type="AzureTlsError",
                non_retryable=True,
            )
        if "non-TLS" in text or "non-https" in text:
            return ApplicationError(
                f"{what}: {text} (azure.arm_endpoint must be https://)", type="AzureConfig", non_retryable=True
            )
        return ApplicationError(f"{what}: ARM unreachable: {text}", type="AzureUnavailable")
    if isinstance(e, HttpResponseError):
        status = e.status_code
        code, message = error_code(e)
        detail = f"{code}: {message}" if code else message
        if isinstance(e, ClientAuthenticationError) or status == 401:
            return ApplicationError(
                f"{what}: authentication refused by ARM ({detail})", type="AzureAuthFailed", non_retryable=True
            )
        if status == 403:
            return ApplicationError(
                f"{what}: permission denied by ARM ({detail})", type="AzurePermissionDenied", non_retryable=True
            )
        if isinstance(e, ResourceNotFoundError) or status == 404:
            return ApplicationError(f"{what}: not found ({detail})", type="AzureResourceNotFound", non_retryable=True)
        if status in (400, 405, 422):
            return ApplicationError(
                f"{what}: ARM refused the request ({detail})", type="AzureBadRequest", non_retryable=True
            )
        if status == 409:
            return ApplicationError(f"{what}: conflict ({detail})", type="AzureConflict")
        if status in (200, 201, 202) and code:  # a long-running operation that ended Failed/Canceled
            permanent = code.lower() in _PERMANENT_OPERATION_CODES
            return ApplicationError(
                f"{what}: the operation failed ({detail})", type="AzureOperationFailed", non_retryable=permanent
            )
        return ApplicationError(f"{what}: ARM answered {status} ({detail})", type="AzureUnavailable")
    return ApplicationError(f"{what}: {type(e).__name__}: {e}", type="AzureError")


@contextmanager
def arm_errors(what: str) -> Iterator[None]:
    try:
        yield
    except ApplicationError:
        raise
    except (HttpResponseError, ServiceRequestError, ServiceResponseError) as e:
        raise arm_error(e, what) from None


def wait_poller(poller: Any, what: str, deadline: float) -> Any:
    """Wait for an LROPoller, heartbeating; return its result."""
    started = time.monotonic()
    while not poller.done():
        waited = time.monotonic() - started
        _heartbeat({"phase": what, "operation": poller.status(), "waited_seconds": round(waited, 1)})
        check_cancelled(what)  # the operation goes on in Azure; whoever comes next finds it by the resource's state
        if time.monotonic() > deadline:
            raise ApplicationError(
                f"{what}: the ARM operation is still {poller.status()} after {waited:.0f}s",
                type="AzureOperationTimeout",
            )
        poller.wait(timeout=1.0)
    return poller.result()


def field(obj: Any, *path: str) -> Any:
    """obj.a.b... over SDK models or dicts; None where a step is missing; enums as their plain string value."""
    for key in path:
        if obj is None:
            return None
        obj = obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)
    if isinstance(obj, Enum):
        return obj.value
    return obj


def utc(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return utc(datetime.fromisoformat(text.strip().replace("Z", "+00:00")))
    except ValueError:
        return None


def iso(t: datetime) -> str:
    return utc(t).isoformat(timespec="microseconds").replace("+00:00", "Z")  # type: ignore[union-attr]


def same_id(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and a.strip("/").lower() == b.strip("/").lower()  # type: ignore[union-attr]
