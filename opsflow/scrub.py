"""Keep resolved secret values out of every activity failure (the history keeps failure messages and stack
traces; a worker's log keeps them too).

`activities.secrets.resolve` registers every value it hands out; `ScrubInterceptor` (installed on every worker)
rewrites a failing activity's exception, and each exception in its cause/context chain, so no registered value
appears in a message or in ApplicationError details. A library quoting a secret does so in its own way, so each
value is registered in the forms it is quoted in: as is, stripped (a key with a trailing newline), URL-quoted,
escaped as repr() shows it, and for a URL also without its scheme and as its path (what http.client names).
"""

from __future__ import annotations

import re
import threading
from typing import Any
from urllib.parse import quote, quote_plus

from temporalio.exceptions import ApplicationError, FailureError
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

REDACTED = "[redacted]"
# Shorter values are too likely to be ordinary words (scrubbing "admin" would mangle every message naming it).
MIN_LENGTH = 6

_lock = threading.Lock()
_values: set[str] = set()
_pattern: re.Pattern[str] | None = None


def _forms(value: str) -> set[str]:
    forms = set()
    for v in {value, value.strip(), *value.splitlines()}:  # a multi-line secret may be quoted a line at a time
        v2 = v.strip()
        for f in (v, v2):
            forms |= {f, quote(f, safe=""), quote(f), quote_plus(f), repr(f)[1:-1]}
        if "://" in v2:
            rest = v2.split("://", 1)[1]
            forms.add(rest)  # what a library that dropped the scheme (or a URL written without one) shows
            if "/" in rest:
                forms.add(rest[rest.index("/"):])  # path and query: a webhook's secret part, as http.client names it
    return {f for f in forms if len(f) >= MIN_LENGTH}


def register(value: str | None) -> None:
    """Scrub this secret value (in its quoted forms) from activity failures from now on, process-wide."""
    global _pattern
    if not value:
        return
    forms = _forms(value)
    with _lock:
        if forms <= _values:
            return
        _values.update(forms)
        _pattern = None


def forget_all() -> None:
    """Tests only: start from no registered value."""
    global _pattern
    with _lock:
        _values.clear()
        _pattern = None


def _compiled() -> re.Pattern[str] | None:
    global _pattern
    with _lock:
        if _pattern is None and _values:
            # Longest first: a value's longer form is replaced whole, not just the shorter value inside it.
            _pattern = re.compile("|".join(re.escape(v) for v in sorted(_values, key=len, reverse=True)))
        return _pattern


def scrub(text: str) -> str:
    pattern = _compiled()
    return pattern.sub(REDACTED, text) if pattern and text else text


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub_value(v) for v in value)
    return value


def _next_in_chain(error: BaseException) -> BaseException | None:
    # The order the SDK's failure converter follows: the cause, else the context unless suppressed.
    if error.__cause__ is not None:
        return error.__cause__
    return None if error.__suppress_context__ else error.__context__


def scrubbed(error: BaseException, _depth: int = 0) -> BaseException:
    """`error` itself when no registered value appears in it or its chain; else an ApplicationError chain with the
    same messages (scrubbed), types, retry behaviour and tracebacks."""
    if _compiled() is None or _depth > 20:
        return error
    after = _next_in_chain(error)
    clean_after = scrubbed(after, _depth + 1) if after is not None else None
    if isinstance(error, ApplicationError):
        message = error.message
        details = list(error.details)
    elif isinstance(error, FailureError) or not isinstance(error, Exception):
        # A cancellation and the like keep their meaning; their messages are the SDK's, not a library's.
        return error
    else:
        message, details = str(error), []
    clean_message, clean_details = scrub(message), _scrub_value(details)
    if clean_message == message and clean_details == details and clean_after is after:
        return error
    if isinstance(error, ApplicationError):
        new = ApplicationError(clean_message, *clean_details, type=error.type, non_retryable=error.non_retryable,
                               next_retry_delay=error.next_retry_delay, category=error.category)
    else:
        # The SDK would record it as an ApplicationError named after its class: the same, scrubbed.
        new = ApplicationError(clean_message, type=type(error).__name__)
    new.__traceback__ = error.__traceback__
    new.__cause__ = clean_after
    new.__suppress_context__ = True
    return new


class _ScrubActivityInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            return await self.next.execute_activity(input)
        except Exception as e:
            clean = scrubbed(e)
            if clean is e:
                raise
            raise clean from clean.__cause__


class ScrubInterceptor(Interceptor):
    """Worker interceptor: no registered secret value leaves an activity in its failure."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ScrubActivityInbound(next)
