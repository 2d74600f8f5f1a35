"""A typed reference to an activity: its name (as recorded in histories), its one argument's type and its result's
type, declared once. Workflows call `self.step(name, title, DB_STATUS, target)` and get a `DbStatus` back; the
implementation registers under the same declaration (`@DB_STATUS.implementation`), so a rename or a changed type
fails at import or in tests/unit/test_contracts.py, not in a running procedure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from temporalio import activity

A = TypeVar("A")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

# seconds: the heartbeat timeout of an activity whose implementation heartbeats while it blocks (every 2 s, with
# activities.context.heartbeating): a worker lost just after it took the task costs this, not the start-to-close.
HEARTBEATS = 10.0


@dataclass(frozen=True, eq=False)
class Activity(Generic[A, R]):
    """One activity's contract. `result` is None for an activity that returns nothing. `heartbeat`: the heartbeat
    timeout the kernel schedules it with unless a step says otherwise (its implementation heartbeats; see
    HEARTBEATS); None: it does not heartbeat of itself."""

    name: str
    arg: type[A]
    result: type[R] | None = None
    heartbeat: float | None = None

    def implementation(self, fn: F) -> F:
        """The decorator of the function that implements this contract (a Temporal activity of this name)."""
        fn.__opsflow_contract__ = self  # type: ignore[attr-defined]
        return activity.defn(name=self.name)(fn)

    @property
    def result_type(self) -> Any:
        """What the workflow's payload converter decodes the result into (None: nothing to decode)."""
        return None if self.result in (None, type(None)) else self.result

    def __repr__(self) -> str:
        return f"Activity({self.name!r})"
