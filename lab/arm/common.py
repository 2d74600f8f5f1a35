"""What every part of the ARM emulator shares: ARM's error shape, the resource names, time and SQL helpers."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

import psycopg

from lab.emulator import EmulatorError

DEFAULT_SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
PG_NS = "Microsoft.DBforPostgreSQL"
PG_TYPE = f"{PG_NS}/flexibleServers"
TM_NS = "Microsoft.Network"
TM_TYPE = f"{TM_NS}/trafficManagerProfiles"
ENDPOINT_TYPES = {"azureendpoints": "azureEndpoints", "externalendpoints": "externalEndpoints",
                  "nestedendpoints": "nestedEndpoints"}
ROLES = {"primary": "Primary", "asyncreplica": "AsyncReplica", "geoasyncreplica": "GeoAsyncReplica", "none": "None"}
REPLICA_ROLES = ("AsyncReplica", "GeoAsyncReplica")
DEFAULT_SETTINGS: dict[str, Any] = {
    "lro_seconds": 1.0,  # minimum duration of a long-running operation
    "tm_checking_seconds": 2.0,  # how long an endpoint stays CheckingEndpoint after it is enabled
    "planned_sync_timeout": 60.0,  # Planned promotion: how long to wait for the replica to catch up
    "promote_timeout": 60,  # pg_promote(wait_seconds)
    "lro_retry_after": None,  # Retry-After (seconds) on operation status answers; None: let the client pick
}
AZURE_PG_PORT = 5432  # every flexible server listens there, at its FQDN
LAB_TAG_PREFIX = "opsflow-lab-"
TAG_PORT = "opsflow-lab-port"
TAG_LATEST_RESTORE = "opsflow-lab-latest-restore"
TAG_REBUILD = "opsflow-lab-rebuild"
TAG_ERROR = "opsflow-lab-error"
ERROR_CODES = {
    400: "BadRequest",
    401: "AuthenticationFailed",
    403: "AuthorizationFailed",
    404: "ResourceNotFound",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalServerError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
INVALID_BODY = "The request content was invalid and could not be deserialized: the body must be a JSON object."


class ArmError(EmulatorError):
    """An ARM error answer: HTTP status + {"error": {"code", "message"}}."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def bad_request(message: str, code: str = "BadRequest") -> ArmError:
    return ArmError(400, code, message)


def not_found_resource(rtype: str, name: str, rg: str) -> ArmError:
    return ArmError(
        404,
        "ResourceNotFound",
        f"The Resource '{rtype}/{name}' under resource group '{rg}' was not found. "
        "For more details please go to https://aka.ms/ARMResourceNotFoundFix",
    )


def user_tags(tags: dict) -> dict:
    """Tags as stored: the lab's computed tags (opsflow-lab-*) are never stored, even when a client writes back
    what it read."""
    return {k: v for k, v in tags.items() if not k.lower().startswith(LAB_TAG_PREFIX)}


def check_tags(tags: Any) -> None:
    if tags is not None and not (isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values())):
        raise bad_request("'tags' must be an object of strings.", "InvalidRequestContent")


def parse_time(value: Any) -> datetime:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("not a date-time string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Azure sends up to 7 fractional digits; Python takes 6.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    t = datetime.fromisoformat(text)
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def first_line(e: BaseException | str, limit: int = 2000) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def pg_connect(dsn: str, timeout: int = 3) -> psycopg.Connection:
    return psycopg.connect(dsn, connect_timeout=max(2, int(timeout)), autocommit=True,
                           application_name="arm-emulator")


def lsn_int(text: str | None) -> int:
    if not text:
        return 0
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)
