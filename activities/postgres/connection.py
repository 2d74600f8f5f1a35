"""A connection to a database of the inventory, and psycopg's errors as Temporal's.

The functions of activities.postgres take any `db` with `.dsn` and `.password` (a `SecretRef` or None) and work
inside and outside Temporal activities: where they wait they heartbeat only when running in an activity.

Errors: what retrying cannot fix (bad DSN, missing secret, authentication or permission refused) raises a
non-retryable `ApplicationError`; a lost or refused connection raises a retryable one (type
"DatabaseUnreachable"). The password never appears in a message.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Any, Iterator

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from temporalio.exceptions import ApplicationError

from activities.secrets import resolve

APPLICATION_NAME = "opsflow"


def dsn_of(db: Any) -> str:
    dsn = getattr(db, "dsn", None)
    if not dsn:
        raise ApplicationError(
            "database: the inventory gives no SQL dsn for this database", type="DatabaseConfig", non_retryable=True
        )
    return dsn


def where(db: Any) -> str:
    """'host:port/dbname' of a db's DSN, for messages (never the password). Raises for a malformed DSN."""
    dsn = dsn_of(db)
    try:
        d = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:
        raise ApplicationError(
            f"database: malformed dsn: {str(e).strip()}", type="DatabaseConfig", non_retryable=True
        ) from None
    host = d.get("host") or d.get("hostaddr") or "localhost"
    return f"{host}:{d.get('port') or 5432}/{d.get('dbname') or d.get('user') or ''}"


def redact(text: str, secret: str | None) -> str:
    text = str(text).strip()
    if secret:
        text = text.replace(secret, "***")
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text)


# Connection failures that retrying cannot fix: the server answered, and said no.
_PERMANENT_CONNECT = [
    (
        re.compile(
            r"password authentication failed|authentication failed|no password supplied|fe_sendauth|SCRAM|"
            r"pg_hba\.conf|not permitted to log in|permission denied for database",
            re.I,
        ),
        "DatabaseAuthFailed",
    ),
    (
        re.compile(
            r'(role|database) ".*" does not exist|invalid (connection option|sslmode|port)|'
            r"invalid integer value",
            re.I,
        ),
        "DatabaseConfig",
    ),
]


def connect(db: Any, *, connect_timeout: float = 5, autocommit: bool = True) -> psycopg.Connection:
    """Open a connection to db.dsn, with the password fetched from where db.password says it lives."""
    loc = where(db)
    params: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(connect_timeout)),  # libpq: whole seconds, at least 2
        "fallback_application_name": APPLICATION_NAME,
    }
    current = conninfo_to_dict(db.dsn)
    for key, value in (("keepalives", 1), ("keepalives_idle", 10), ("keepalives_interval", 5), ("keepalives_count", 3)):
        if key not in current:
            params[key] = value
    secret = resolve(db.password) if getattr(db, "password", None) is not None else None
    if secret is not None:
        params["password"] = secret
    try:
        conninfo = make_conninfo(db.dsn, **params)
        return psycopg.connect(conninfo, autocommit=autocommit)
    except psycopg.ProgrammingError as e:  # an option libpq does not know
        raise ApplicationError(
            f"database {loc}: bad dsn: {redact(e, secret)}", type="DatabaseConfig", non_retryable=True
        ) from None
    except psycopg.OperationalError as e:
        msg = redact(e, secret)
        for pattern, kind in _PERMANENT_CONNECT:
            if pattern.search(msg):
                raise ApplicationError(
                    f"database {loc}: connection refused by the server: {msg}", type=kind, non_retryable=True
                ) from None
        raise ApplicationError(f"database {loc}: cannot connect: {msg}", type="DatabaseUnreachable") from None


@contextmanager
def sql_errors(db: Any, what: str) -> Iterator[None]:
    """Map psycopg errors raised while talking to the server onto ApplicationErrors."""
    try:
        yield
    except ApplicationError:
        raise
    except pgerrors.InsufficientPrivilege as e:
        raise ApplicationError(
            f"{what} on {where(db)}: permission denied: {redact(e, None)}", type="PermissionDenied", non_retryable=True
        ) from None
    except psycopg.OperationalError as e:  # connection lost, server shutting down, statement timeout
        raise ApplicationError(f"{what} on {where(db)}: {redact(e, None)}", type="DatabaseUnreachable") from None
    except psycopg.Error as e:
        state = f" [{e.sqlstate}]" if getattr(e, "sqlstate", None) else ""
        raise ApplicationError(f"{what} on {where(db)}: {redact(e, None)}{state}", type="DatabaseError") from None


def bad_input(message: str) -> ApplicationError:
    return ApplicationError(message, type="BadInput", non_retryable=True)


def timeout_ms(seconds: float) -> str:
    return str(max(1, int(seconds * 1000)))


def is_name_error(e: psycopg.Error) -> bool:
    # 22xxx data exceptions (invalid name syntax, improper qualified name), 42xxx syntax errors: the name, not the
    # server
    return (
        bool(getattr(e, "sqlstate", None))
        and e.sqlstate[:2] in ("22", "42")
        and not isinstance(e, pgerrors.InsufficientPrivilege)
    )


def error_line(e: psycopg.Error) -> str:
    """The server's primary message and SQLSTATE on one line (no LINE/caret context)."""
    diag = getattr(e, "diag", None)
    text = (diag.message_primary if diag is not None and diag.message_primary else str(e)).strip().splitlines()[0]
    state = f" [{e.sqlstate}]" if getattr(e, "sqlstate", None) else ""
    return redact(text, None) + state
