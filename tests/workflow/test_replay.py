"""Replay every recorded history against today's workflow code: a change that would break an in-flight run
fails here. Histories are recorded once (tests/workflow/record_history.py) and never re-recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from opsflow.procedures import PROCEDURES, fleet_workflow_id
from opsflow.temporal import DATA_CONVERTER
from tests.workflow.conftest import WORKFLOWS

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


# The recorded run's id where it was not opsflow-replay (a fleet's id names its environments).
IDS = {"maintenance-fleet_worker-rules": fleet_workflow_id(["replay-a", "replay-b"])}


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_recorded_history_replays(path: Path):
    history = WorkflowHistory.from_json(IDS.get(path.stem, "opsflow-replay"), path.read_text())  # the recorded run's id
    assert len(history.events) > 10  # a whole run, not a stub
    result = await Replayer(workflows=WORKFLOWS, data_converter=DATA_CONVERTER).replay_workflow(
        history, raise_on_replay_failure=False
    )
    assert result.replay_failure is None, result.replay_failure


def test_every_procedure_has_a_recorded_history_of_its_current_shape():
    """Every procedure the worker runs (opsflow/procedures.py), in the shape since the worker holds the rules."""
    recorded = {p.stem.split("_")[0].removesuffix("-worker-rules") for p in HISTORIES if "worker-rules" in p.stem}
    assert {p.name for p in PROCEDURES} <= recorded
    assert [w.__temporal_workflow_definition.name for w in WORKFLOWS] == [p.name for p in PROCEDURES]
