"""Helpers for code that runs both inside an activity and outside one (tests, the lab, the bench).

Cancellation of a synchronous activity (how the SDK delivers it, temporalio 1.x): the server tells the worker
an activity was cancelled in the answer to a heartbeat, so an activity that does not heartbeat never learns
it. The worker then sets the activity's cancelled event (`activity.is_cancelled()` turns true) and, for
activities on a ThreadPoolExecutor, raises `temporalio.exceptions.CancelledError` asynchronously in the
activity's thread (at the next Python bytecode; a blocking C call such as a socket read finishes first).
So: heartbeat on every poll, wait with `sleep_or_cancelled` (it returns at once on cancellation), and wrap
what must not be cut in half (a cloud request whose outcome must be recorded) in `shielded()`: the
exception is held back until the block ends. Heartbeats are sent at most every `max_heartbeat_throttle_interval`
of the worker (worker/main.py sets it to a couple of seconds, so a cancellation arrives within seconds).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

from temporalio import activity
from temporalio.exceptions import CancelledError


def heartbeat(*details: Any) -> None:
    """Heartbeat when running as an activity; nothing otherwise."""
    if activity.in_activity():
        activity.heartbeat(*details)


def logger(fallback: logging.Logger) -> Any:
    """The activity's logger (its records carry the activity's context) inside an activity; `fallback` outside."""
    return activity.logger if activity.in_activity() else fallback


def time_limit(default: float) -> float:
    """How long this activity may wait: its start-to-close (else schedule-to-close) timeout less a margin, so
    it reports a timeout itself instead of being cut off by the server; `default` outside an activity."""
    if activity.in_activity():
        info = activity.info()
        limit = info.start_to_close_timeout or info.schedule_to_close_timeout
        if limit:
            return max(5.0, limit.total_seconds() - 5.0)
    return default


def cancelled() -> bool:
    """Whether this activity has been asked to stop (cancellation delivered with a heartbeat answer)."""
    return activity.in_activity() and activity.is_cancelled()


def check_cancelled(what: str = "") -> None:
    """Raise CancelledError when this activity has been cancelled: call it between the steps of a long action."""
    if cancelled():
        raise CancelledError(f"cancelled{': ' + what if what else ''}")


def sleep_or_cancelled(seconds: float, *details: Any, what: str = "") -> None:
    """Heartbeat `details` (when given), then wait `seconds` or until the activity is cancelled, whichever
    comes first; on cancellation raise CancelledError. Outside an activity: a plain sleep."""
    if not activity.in_activity():
        time.sleep(max(0.0, seconds))
        return
    if details:
        activity.heartbeat(*details)
    check_cancelled(what)
    activity.wait_for_cancelled_sync(max(0.0, seconds))
    check_cancelled(what)


class heartbeating:  # noqa: N801 - used as a function: `with heartbeating("..."):`
    """Heartbeat `what` every `every` seconds while the block runs: a blocking call (one long SQL statement, a
    request to the cloud) keeps the activity alive and a killed worker is noticed within the heartbeat timeout.
    `with` (a synchronous activity): from a helper thread, in a copy of this thread's context (where the activity's
    context lives); `async with` (an asynchronous one): from a task on the activity's event loop. Outside an
    activity: nothing."""

    def __init__(self, what: str, every: float = 2.0):
        self.what, self.every = what, every
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task | None = None

    def __enter__(self) -> None:
        if not activity.in_activity():
            return
        beat = contextvars.copy_context()

        def loop() -> None:
            while not self._done.wait(self.every):
                beat.run(activity.heartbeat, self.what)

        self._thread = threading.Thread(target=loop, name=f"heartbeat: {self.what}", daemon=True)
        self._thread.start()

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    async def __aenter__(self) -> None:
        if not activity.in_activity():
            return

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.every)
                activity.heartbeat(self.what)

        self._task = asyncio.create_task(loop(), name=f"heartbeat: {self.what}")

    async def __aexit__(self, *exc: Any) -> None:
        if self._task is not None:
            self._task.cancel()  # not awaited: a cancellation of the activity itself must not be absorbed here


@contextmanager
def shielded() -> Iterator[None]:
    """Hold back the SDK's asynchronous CancelledError until the block ends (a request to the cloud and the
    recording of its outcome stay together). Outside an activity: nothing."""
    with activity.shield_thread_cancel_exception() if activity.in_activity() else nullcontext():
        yield


class Backoff:
    """Delays for polling: `first`, growing by `factor` up to `cap` (0.2 s -> ~2 s by default)."""

    def __init__(self, first: float = 0.2, cap: float = 2.0, factor: float = 1.5):
        self.first, self.cap, self.factor = first, cap, factor
        self.delay = first

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.cap, self.delay * self.factor)
        return delay

    def reset(self) -> None:
        self.delay = self.first


class Every:
    """At most once per `interval` seconds (the control-plane budget): `due()` is true on the first call and
    then once the interval has passed since the last true answer."""

    def __init__(self, interval: float):
        self.interval = max(0.0, interval)
        self._last: float | None = None

    def due(self) -> bool:
        now = time.monotonic()
        if self._last is None or now - self._last >= self.interval:
            self._last = now
            return True
        return False
