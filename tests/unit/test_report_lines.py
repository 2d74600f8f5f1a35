"""What a terminal shows of a step (opsflow/report.py step_line): a dry run's planned step names itself once."""

from __future__ import annotations

from datetime import datetime, timezone

from opsflow.models import StepRecord
from opsflow.report import shown_detail, step_line

TITLE = "annotate service web in eastus maintenance=true"


def test_a_planned_step_shows_its_title_once():
    at = datetime(2026, 12, 7, tzinfo=timezone.utc)
    line = step_line(StepRecord(name="maintenance", title=TITLE, outcome="planned", detail=TITLE, started_at=at,
                                ended_at=at))
    assert line.count(TITLE) == 1 and line.rstrip().endswith(TITLE)
    assert "0.00s" not in line  # it did not run


def test_a_conditional_step_shows_its_condition_beside_its_title():
    step = StepRecord(name="verify-smoke", title="1 smoke URL(s) answer", outcome="skipped",
                      detail="1 smoke URL(s) answer (when smoke URLs are configured)")
    assert shown_detail(step) == "when smoke URLs are configured"
    assert step_line(step).endswith("1 smoke URL(s) answer  (when smoke URLs are configured)")


def test_a_step_that_ran_keeps_its_detail_whole():
    step = StepRecord(name="catch-up", title="Wait until westeurope has caught up", outcome="ok",
                      detail="0 bytes behind after 1s")
    assert step_line(step).endswith("Wait until westeurope has caught up  (0 bytes behind after 1s)")
