from datetime import datetime

import pytest
from pydantic import ValidationError

from opsflow.inventory import TimeWindow


def at(s: str) -> datetime:
    return datetime.fromisoformat(s)


def test_inside_the_window_is_none_and_outside_gives_the_next_opening():
    w = TimeWindow(days=["sun"], start="02:00", end="04:00")
    assert w.next_opening(at("2026-11-22T03:00:00+00:00")) is None  # Sunday 03:00
    assert w.next_opening(at("2026-11-22T01:59:00+00:00")) == at("2026-11-22T02:00:00+00:00")
    assert w.next_opening(at("2026-11-22T04:00:00+00:00")) == at("2026-11-29T02:00:00+00:00")  # closed at 04:00
    assert w.next_opening(at("2026-11-23T03:00:00+00:00")) == at("2026-11-29T02:00:00+00:00")


def test_window_across_midnight_and_time_zone():
    w = TimeWindow(days=["sat"], start="23:00", end="01:00", timezone="Europe/Berlin")
    assert w.next_opening(at("2026-11-21T23:30:00+00:00")) is None  # Sunday 00:30 Berlin, inside Saturday's window
    assert w.next_opening(at("2026-11-22T00:30:00+00:00")) == at("2026-11-28T22:00:00+00:00")


def test_bad_window_is_refused():
    with pytest.raises(ValidationError, match="timezone"):
        TimeWindow(days=["sun"], start="02:00", end="04:00", timezone="Mars/Olympus")
    with pytest.raises(ValidationError, match="start"):
        TimeWindow(days=["sun"], start="25:00", end="04:00")
