"""Replay a recorded failover history against today's workflow code: a non-deterministic change fails here."""

from __future__ import annotations

from pathlib import Path

from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from opsflow.temporal import DATA_CONVERTER
from workflows.failover import FailoverWorkflow

HISTORIES = Path(__file__).parent / "histories"


async def test_recorded_failover_history_replays():
    path = HISTORIES / "failover_planned.json"
    history = WorkflowHistory.from_json("recorded", path.read_text())
    assert len(history.events) > 40  # a whole failover, not a stub
    result = await Replayer(workflows=[FailoverWorkflow], data_converter=DATA_CONVERTER).replay_workflow(history)
    assert result.replay_failure is None
